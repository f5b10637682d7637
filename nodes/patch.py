"""Install a sparse-attention controller on a clone of a ComfyUI ModelPatcher (the native path).

The base MODEL is never changed: everything goes onto ``model.clone()``:
the attention override (chaining any override already there), a DIFFUSION_MODEL wrapper that
records grid and sigma per forward, an ON_PREPARE_STATE callback that keeps our override on
top, and per-block ``patches_replace["dit"]`` tags where the model code sets no ``block_index``.
"""

from __future__ import annotations

from typing import Any

from . import override as ov


def _hook_names() -> tuple[str, str]:
    """ComfyUI's names for the diffusion-model wrapper and the per-step callback."""
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    return WrappersMP.DIFFUSION_MODEL, CallbacksMP.ON_PREPARE_STATE


def model_layout(model: Any) -> tuple[ov.ModelFamily, int, int, int | None]:
    """(family, double blocks, single blocks, heads or None) of a ModelPatcher's diffusion model."""
    diffusion_model = model.get_model_object("diffusion_model")
    family = ov.family_of(diffusion_model)
    n_double, n_single = ov.block_counts(diffusion_model, family)
    return family, n_double, n_single, getattr(diffusion_model, "num_heads", None)


def check_strategy_fits(strategy: Any, model: Any) -> None:
    """ValueError naming both sizes when the strategy was made for another layer/head count."""
    family, n_double, n_single, heads = model_layout(model)
    layers = n_double + n_single
    if strategy.layers != layers or (heads is not None and strategy.heads != heads):
        raise ValueError(
            f"this strategy is for {strategy.layers} layers x {strategy.heads} heads, but the "
            f"{family.name} MODEL has {layers} layers x {heads if heads is not None else '?'} heads")


def install_controller(model: Any, controller: Any) -> Any:
    """A clone of ``model`` whose self-attention goes through ``controller`` (SparseEngine API)."""
    wrapper_type, prepare_state = _hook_names()
    family, n_double, n_single, _heads = model_layout(model)
    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    override = ov.SparseAttentionOverride(controller, family, n_double, previous=options.get(ov.OVERRIDE_KEY))
    options[ov.OVERRIDE_KEY] = override

    patched.remove_wrappers_with_key(wrapper_type, ov.WRAPPER_KEY)
    patched.add_wrapper_with_key(wrapper_type, ov.WRAPPER_KEY, ov.ForwardWrapper(family))
    patched.remove_callbacks_with_key(prepare_state, ov.WRAPPER_KEY)
    patched.add_callback_with_key(prepare_state, ov.WRAPPER_KEY, ov.ReinstallOnPrepare(override))

    if not family.count_calls and not ov.sets_block_index(model.get_model_object("diffusion_model")):
        existing = options.get("patches_replace", {}).get("dit", {})
        blocks = [("double_block", i, i) for i in range(n_double)]
        blocks += [("single_block", j, n_double + j) for j in range(n_single)]
        for kind, index, layer in blocks:
            previous = existing.get((kind, index))
            if isinstance(previous, ov.BlockTag):  # ours from an earlier Apply: replace, not stack
                previous = previous.previous
            patched.set_model_patch_replace(ov.BlockTag(layer, previous), "dit", kind, index)
    return patched


def apply_strategy(model: Any, strategy: Any, *, force_reference: bool = False) -> Any:
    """A clone of ``model`` running ``strategy``; force_reference runs the pure-torch kernel anywhere."""
    from ..strategies.engine import SparseEngine

    check_strategy_fits(strategy, model)
    return install_controller(model, SparseEngine(strategy, force_reference=force_reference))
