"""HunyuanVideo (diffusers `HunyuanVideoTransformer3DModel`): joint-attention sites, geometry, install.

The 20 dual-stream and 40 single-stream blocks attend over `[video (t, y, x) | text]`, text last;
they are layers 0..19 and 20..59 (single blocks offset by the number of dual blocks). The token
refiner (text only) stays stock. Padded text: at batch 1 the padded text is cut off before the
controller (the padded text queries are answered densely from the valid keys, which is what the
stock mask computes); at batch > 1 the controller gets per-sample key lengths `kv_len`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from ..kernels.rotary import rotate_pairs
from ..strategies.geometry import VideoGeometry
from .common import InstalledSites, SiteContext, SiteProcessor, install_sites


def hunyuan_geometry(latent_shape: Sequence[int], patch: int, patch_t: int, text_tokens: int) -> VideoGeometry:
    """Geometry of a HunyuanVideo latent `[B, C, T, H, W]` followed by `text_tokens` text tokens."""
    if len(latent_shape) != 5:
        raise ValueError(f"HunyuanVideo latents must be [B, C, T, H, W], got shape {tuple(latent_shape)}")
    _, _, t, h, w = latent_shape
    if t % patch_t or h % patch or w % patch:
        raise ValueError(f"HunyuanVideo latent T x H x W = {t} x {h} x {w} is not divisible by patch ({patch_t}, {patch}, {patch})")
    return VideoGeometry(frames=t // patch_t, height=h // patch, width=w // patch, suffix=text_tokens)


class HunyuanJointAttention(SiteProcessor):
    """Processor of a dual- or single-stream block: the stock math, attention through the controller."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None:
            raise ValueError("HunyuanJointAttention needs the text stream (encoder_hidden_states)")
        n_text = encoder_hidden_states.shape[1]
        single = attn.add_q_proj is None
        if single:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        q, k, v = _qkv(hidden_states, attn.heads, (attn.to_q, attn.to_k, attn.to_v), attn.norm_q, attn.norm_k)
        if image_rotary_emb is not None:
            q, k = (_rotate_video(x, image_rotary_emb, n_text if single else 0) for x in (q, k))
        if not single:
            tq, tk, tv = _qkv(encoder_hidden_states, attn.heads, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                              attn.norm_added_q, attn.norm_added_k)
            q, k, v = torch.cat([q, tq], dim=1), torch.cat([k, tk], dim=1), torch.cat([v, tv], dim=1)

        out = self._attention(q, k, v, attention_mask).flatten(2, 3).to(q.dtype)
        video, text = out[:, :-n_text], out[:, -n_text:]
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text

    def _dense(self, mask):
        def dense(q, k, v):
            return dispatch_attention_fn(
                q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )
        return dense

    def _attention(self, q, k, v, mask):
        """Controller attention over `[B, L, H, D]`, padded text trimmed (batch 1) or as kv_len."""
        n = self.context.trim_to
        if n is None:
            return self.attend(q, k, v, layout="blhd", dense=self._dense(mask), kv_len=self.context.kv_len)
        unmasked = self._dense(None)
        kept = self.attend(q[:, :n], k[:, :n], v[:, :n], layout="blhd", dense=unmasked)
        padded_queries = unmasked(q[:, n:], k[:, :n], v[:, :n])
        return torch.cat([kept, padded_queries], dim=1)


def _qkv(x: torch.Tensor, heads: int, projections, norm_q, norm_k) -> tuple[torch.Tensor, ...]:
    """q, k, v `[B, L, heads, D]` of `x` through the three projections, q and k normalised when the
    block has the norms."""
    q, k, v = (proj(x).unflatten(2, (heads, -1)) for proj in projections)
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


def _rotate_video(x: torch.Tensor, rope, n_text: int) -> torch.Tensor:
    """RoPE on the video rows of `[B, L, H, D]`; the last `n_text` rows (text) stay as they are."""
    if n_text == 0:
        return rotate_pairs(x, *rope)
    out = torch.empty_like(x)
    rotate_pairs(x[:, :-n_text], *rope, out=out[:, :-n_text])
    out[:, -n_text:] = x[:, -n_text:]
    return out


def hunyuan_sites(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """`(layer, attn)` for the dual blocks (0..n-1), then the single blocks (n..)."""
    dual = [block.attn for block in model.transformer_blocks]
    single = [block.attn for block in model.single_transformer_blocks]
    return list(enumerate(dual + single))


def install(model: torch.nn.Module, controller: Any) -> InstalledSites:
    """Route every HunyuanVideo joint attention through `controller`; `handle.remove()` restores."""
    patch, patch_t = model.config.patch_size, model.config.patch_size_t

    def read_forward(context: SiteContext, named: dict) -> None:
        latent_shape = named["hidden_states"].shape
        n_text = named["encoder_hidden_states"].shape[1]
        full = hunyuan_geometry(latent_shape, patch, patch_t, n_text)
        mask = named.get("encoder_attention_mask")
        valid = torch.full((latent_shape[0],), n_text) if mask is None else mask.sum(dim=1).to(torch.int64).cpu()
        context.trim_to, context.kv_len, context.geometry = None, None, full
        if bool((valid == n_text).all()):
            return
        video = full.grid_tokens
        if latent_shape[0] == 1:
            context.trim_to = video + int(valid[0])
            context.geometry = hunyuan_geometry(latent_shape, patch, patch_t, int(valid[0]))
        else:
            context.kv_len = (video + valid).to(device=named["hidden_states"].device, dtype=torch.int32)

    return install_sites(model, controller, hunyuan_sites(model), HunyuanJointAttention, read_forward)
