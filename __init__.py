"""Sparse-vDiT: searched per-head sparse attention for video diffusion transformers.

Importing this package stays cheap and works without ComfyUI. ComfyUI finds
`comfy_entrypoint` and `WEB_DIRECTORY` here; the nodes load only when ComfyUI asks.
"""

__version__ = "0.1.0"
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """ComfyUI V3 entry point: returns the extension that lists our nodes."""
    from .nodes import extension

    return await extension.make_extension()
