"""Wan2.1 / Wan2.2 (diffusers `WanTransformer3DModel`): self-attention sites, geometry, install.

Self-attention (`blocks[i].attn1`) sees video tokens only, frame-major; cross-attention (`attn2`,
text and CLIP-image tokens) stays stock.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from ..kernels.rotary import rotate_pairs
from ..strategies.geometry import VideoGeometry
from .common import InstalledSites, SiteContext, SiteProcessor, install_sites


def wan_geometry(latent_shape: Sequence[int], patch_size: Sequence[int], prefix: int = 0) -> VideoGeometry:
    """Geometry of a Wan latent `[B, C, T, H, W]` patched by `(pt, ph, pw)`; `prefix` counts
    reference tokens placed before the grid (none in diffusers' Wan)."""
    if len(latent_shape) != 5:
        raise ValueError(f"Wan latents must be [B, C, T, H, W], got shape {tuple(latent_shape)}")
    pt, ph, pw = patch_size
    _, _, t, h, w = latent_shape
    if t % pt or h % ph or w % pw:
        raise ValueError(f"Wan latent T x H x W = {t} x {h} x {w} is not divisible by patch {tuple(patch_size)}")
    return VideoGeometry(frames=t // pt, height=h // ph, width=w // pw, prefix=prefix)


class WanSelfAttention(SiteProcessor):
    """Processor of `blocks[layer].attn1`: the stock Wan math with attention through the controller."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attn.add_k_proj is not None:
            raise ValueError("WanSelfAttention is for self-attention sites (attn1) only")
        if attn.fused_projections:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
        v = v.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:  # (cos, sin) [1, L, 1, D]
            cos, sin = (t[0, :, 0] for t in rotary_emb)
            q, k = rotate_pairs(q, cos, sin, "wan"), rotate_pairs(k, cos, sin, "wan")

        def dense(q, k, v):
            return dispatch_attention_fn(
                q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )

        out = self.attend(q, k, v, layout="blhd", dense=dense)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def wan_sites(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """`(layer, blocks[layer].attn1)` for every block."""
    return [(i, block.attn1) for i, block in enumerate(model.blocks)]


def install(model: torch.nn.Module, controller: Any) -> InstalledSites:
    """Route every Wan self-attention through `controller`; `handle.remove()` restores stock."""
    patch = tuple(model.config.patch_size)

    def read_forward(context: SiteContext, named: dict) -> None:
        context.geometry = wan_geometry(named["hidden_states"].shape, patch)

    return install_sites(model, controller, wan_sites(model), WanSelfAttention, read_forward)
