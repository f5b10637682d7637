"""Tiny random-weight native checkpoints that ComfyUI's UNETLoader accepts, written at test time.

The weights come from a diffusers model at a tiny size (dim 256 = 2 heads x 128); the original
(Wan repository) key names are recovered through our adapters' key map (original -> diffusers),
run on marker tensors, so the file round-trips exactly through ``adapters.loading``.
"""

from __future__ import annotations

import torch

from sparse_vdit.adapters.loading import to_diffusers_keys

WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=512, num_layers=3, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def wan_original_keys(layers: int) -> list[str]:
    """Parameter names of a Wan2.1 T2V checkpoint in the original (non-diffusers) naming."""
    keys = ["patch_embedding.weight", "patch_embedding.bias", "head.head.weight", "head.head.bias",
            "head.modulation"]
    keys += [f"{m}.{i}.{p}" for m in ("time_embedding", "text_embedding") for i in (0, 2) for p in ("weight", "bias")]
    keys += ["time_projection.1.weight", "time_projection.1.bias"]
    for b in range(layers):
        keys.append(f"blocks.{b}.modulation")
        for attn in ("self_attn", "cross_attn"):
            keys += [f"blocks.{b}.{attn}.{n}.{p}" for n in "qkvo" for p in ("weight", "bias")]
            keys += [f"blocks.{b}.{attn}.norm_{n}.weight" for n in "qk"]
        keys += [f"blocks.{b}.norm3.{p}" for p in ("weight", "bias")]
        keys += [f"blocks.{b}.ffn.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    return keys


def tiny_wan_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random tiny Wan2.1 T2V state dict in original key names (scaled so activations stay sane)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**WAN_TINY)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    original = wan_original_keys(WAN_TINY["num_layers"])
    markers = to_diffusers_keys("wan", {k: torch.tensor([float(i)]) for i, k in enumerate(original)})
    if set(markers) != set(reference):
        raise AssertionError(f"key map mismatch: {sorted(set(markers) ^ set(reference))[:6]}")
    return {original[int(v.item())]: reference[k].contiguous() for k, v in markers.items()}
