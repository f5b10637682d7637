"""Between our samplers' latents and ComfyUI's LATENT convention (no comfy import).

A ComfyUI LATENT holds the raw VAE latent ``[B, C, F, H, W]``; ComfyUI normalises it for the
model and VAE Decode takes it raw. Our diffusers samplers work on normalised latents (Wan
mean/std, HunyuanVideo and CogVideoX scaling factor; CogVideoX as ``[B, F, C, H, W]``). The
constants come from the shipped VAE configs, so a Wan or HunyuanVideo LATENT from our Sampler
also decodes with ComfyUI's own VAE Decode.
"""

from __future__ import annotations

import torch

from ..adapters.loading import shipped_config

VAE_CONFIGS = {"wan": "wan2.1-vae", "hunyuanvideo": "hunyuanvideo-vae", "cogvideox": "cogvideox1.5-vae"}


def _scale(family: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) so that raw = normalised * std + mean, broadcastable over [B, C, F, H, W]."""
    if family not in VAE_CONFIGS:
        raise ValueError(f"family must be one of {sorted(VAE_CONFIGS)}, got {family!r}")
    config = shipped_config(VAE_CONFIGS[family])
    if family == "wan":
        if like.shape[1] != len(config["latents_mean"]):
            raise ValueError(f"a Wan latent with {like.shape[1]} channels has no ComfyUI VAE convention "
                             f"(the Wan2.1 VAE has {len(config['latents_mean'])})")
        mean = torch.tensor(config["latents_mean"], dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(config["latents_std"], dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
        return mean, std
    return torch.zeros((), dtype=like.dtype, device=like.device), \
        torch.full((), 1.0 / config["scaling_factor"], dtype=like.dtype, device=like.device)


def to_comfy(latents: torch.Tensor, family: str) -> torch.Tensor:
    """Sampler latents (normalised; CogVideoX [B, F, C, H, W]) -> raw [B, C, F, H, W]."""
    if family == "cogvideox":
        latents = latents.permute(0, 2, 1, 3, 4)
    mean, std = _scale(family, latents)
    return latents * std + mean


def from_comfy(raw: torch.Tensor, family: str) -> torch.Tensor:
    """Raw [B, C, F, H, W] -> what our samplers and adapters.loading.decode_video take."""
    if raw.ndim != 5:
        raise ValueError(f"expected a video LATENT [B, C, F, H, W], got shape {tuple(raw.shape)}")
    mean, std = _scale(family, raw)
    latents = (raw - mean) / std
    return latents.permute(0, 2, 1, 3, 4) if family == "cogvideox" else latents
