"""CogVideoX / CogVideoX1.5 (diffusers `CogVideoXTransformer3DModel`): sites, geometry, RoPE, install.

Self-attention (`transformer_blocks[i].attn1`) sees `[text | video (t, y, x)]`, text first, as
`[B, H, L, D]`. The model does not build its RoPE: `cogvideox_rope` does it as the pipeline does.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

from ..kernels.rotary import rotate_pairs
from ..strategies.geometry import VideoGeometry
from .common import InstalledSites, SiteContext, SiteProcessor, install_sites


def cogvideox_geometry(latent_shape: Sequence[int], patch: int, patch_t: int | None, text_tokens: int) -> VideoGeometry:
    """Geometry of `text_tokens` text tokens followed by a CogVideoX latent `[B, F, C, H, W]`."""
    if len(latent_shape) != 5:
        raise ValueError(f"CogVideoX latents must be [B, F, C, H, W], got shape {tuple(latent_shape)}")
    _, f, _, h, w = latent_shape
    pt = patch_t or 1
    if f % pt or h % patch or w % patch:
        raise ValueError(f"CogVideoX latent F x H x W = {f} x {h} x {w} is not divisible by patch ({pt}, {patch}, {patch})")
    return VideoGeometry(frames=f // pt, height=h // patch, width=w // patch, prefix=text_tokens)


def cogvideox_rope(config, latent_shape: Sequence[int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The `image_rotary_emb` (cos, sin) `[L_video, head_dim]` the CogVideoX pipeline builds for a
    latent `[B, F, C, H, W]` (1.5: slice grid bounded by sample_height/width; 1.0: resize-crop)."""
    _, frames, _, h, w = latent_shape
    p, pt = config.patch_size, config.patch_size_t
    base_h, base_w = config.sample_height // p, config.sample_width // p
    if pt is None:
        crops = get_resize_crop_region_for_grid((h // p, w // p), base_w, base_h)
        return get_3d_rotary_pos_embed(
            embed_dim=config.attention_head_dim, crops_coords=crops, grid_size=(h // p, w // p),
            temporal_size=frames, device=device,
        )
    if h // p > base_h or w // p > base_w:
        raise ValueError(f"CogVideoX latent {h} x {w} exceeds the RoPE grid of sample_height/width {config.sample_height} x {config.sample_width}")
    return get_3d_rotary_pos_embed(
        embed_dim=config.attention_head_dim, crops_coords=None, grid_size=(h // p, w // p),
        temporal_size=(frames + pt - 1) // pt, grid_type="slice", max_size=(base_h, base_w), device=device,
    )


class CogVideoXSelfAttention(SiteProcessor):
    """Processor of `transformer_blocks[layer].attn1`: the stock math, attention through the controller."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        n_text = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, seq_len, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:  # in place on the video rows, as the stock processor does
            cos, sin = (t.to(q.device) for t in image_rotary_emb)
            for x in (q, k) if not attn.is_cross_attention else (q,):
                video = x[:, :, n_text:].transpose(1, 2)
                rotate_pairs(video, cos, sin, out=video)

        def dense(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)

        if attention_mask is not None:
            self.context.warn_once("mask", "sparse_vdit: CogVideoX attention with a mask runs dense")
            out = dense(q, k, v)
        else:
            out = self.attend(q, k, v, layout="bhld", dense=dense)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        text, video = out.split([n_text, out.size(1) - n_text], dim=1)
        return video, text


def cogvideox_sites(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """`(layer, transformer_blocks[layer].attn1)` for every block."""
    return [(i, block.attn1) for i, block in enumerate(model.transformer_blocks)]


def install(model: torch.nn.Module, controller: Any) -> InstalledSites:
    """Route every CogVideoX self-attention through `controller`; `handle.remove()` restores."""
    patch, patch_t = model.config.patch_size, model.config.patch_size_t

    def read_forward(context: SiteContext, named: dict) -> None:
        n_text = named["encoder_hidden_states"].shape[1]
        context.geometry = cogvideox_geometry(named["hidden_states"].shape, patch, patch_t, n_text)

    return install_sites(model, controller, cogvideox_sites(model), CogVideoXSelfAttention, read_forward)
