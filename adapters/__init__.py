"""adapters: video DiT families through diffusers (Wan2.x, HunyuanVideo, CogVideoX1.5).

Per family (wan.py, hunyuan.py, cogvideox.py): the self-attention sites, the token layout ->
`VideoGeometry`, and `install(model, controller) -> InstalledSites`, which gives every site its own
processor (layer index fixed at construction) reproducing the stock math and handing q/k/v after
QK-norm and RoPE to `controller.attention(...)` (DESIGN.md section 7). `handle.remove()` restores
the stock processors. loading.py loads weights offline; sampling.py holds the sampling loops.

How the controller learns sigma: a forward pre-hook on the model reads each forward's inputs
(geometry from the latent shape; sigma = timestep / 1000 by default, exact for the flow-matching
families, a normalised timestep for CogVideoX). The sampling loops pin the exact scheduler sigma
with `handle.begin_step(sigma, step)`, which also calls `controller.begin_step(sigma, step)` when
the controller has that method.

Importing this package is cheap; the family modules import diffusers.
"""
