"""The ComfyExtension listing our nodes (called from the package's ``comfy_entrypoint``).

ComfyUI older than 0.3.60 lacks the attention override our patch needs (and before 0.3.47 the
V3 API): it gets one clear message, raised as a RuntimeError, which ComfyUI logs as a single
"Error while calling comfy_entrypoint" line instead of a traceback. The override ("Enable Runtime
Selection of Attention Functions", #9639) was merged on 2025-09-12, two days after the v0.3.59 tag:
v0.3.59 itself has no `wrap_attn` (checked in ComfyUI's git, and in a real v0.3.59 tree, which logs
this message), v0.3.60 is the first release with it.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)
MIN_COMFYUI = "0.3.60"
TOO_OLD = (f"Sparse-vDiT needs ComfyUI >= {MIN_COMFYUI} (V3 node API and the attention override); "
           "this ComfyUI has {missing}. Update ComfyUI to use the Sparse-vDiT nodes.")


def missing_support() -> str | None:
    """What this ComfyUI lacks for our nodes, or None when it has everything."""
    try:
        from comfy_api.latest import ComfyExtension, io  # noqa: F401
    except ImportError:
        return "no comfy_api.latest"
    try:
        from comfy.ldm.modules import attention
    except ImportError:
        return "no comfy.ldm.modules.attention"
    if not hasattr(attention, "wrap_attn"):
        return "no optimized_attention_override hook"
    return None


def node_classes() -> list:
    """Every node class of the extension; the diffusers-path nodes only when diffusers imports."""
    from . import compare_node, search_node, strategy_nodes

    nodes = [*strategy_nodes.NODES, *search_node.NODES, *compare_node.NODES]
    try:
        from . import diffusers_nodes
    except ImportError as err:
        log.warning("Sparse-vDiT: the diffusers-path nodes (Load Model / Sampler / Decode) are off: %s; "
                    "pip install diffusers to use them", err)
    else:
        nodes += diffusers_nodes.NODES
    return nodes


async def make_extension():
    """Register the strategy folder and routes, and return the extension (RuntimeError if too old)."""
    missing = missing_support()
    if missing is not None:
        raise RuntimeError(TOO_OLD.format(missing=missing))
    from comfy_api.latest import ComfyExtension

    from . import routes, strategy_store

    strategy_store.register_folder()
    routes.register_routes()
    nodes = node_classes()

    class SparseVDiTExtension(ComfyExtension):
        async def get_node_list(self):
            return nodes

    return SparseVDiTExtension()
