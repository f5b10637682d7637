"""Sample testbed videos: (prompt, seed) pairs -> pixel videos, optionally through a controller."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..adapters.sampling import initial_noise, sample_wan
from .data import FRAMES, SIZE, Prompt, prompt_embeddings
from .model import FLOW_SHIFT

SAMPLE_STEPS = 8
GUIDANCE = 3.0


def generate(
    model,
    prompts: Sequence[Prompt | str],
    seeds: Sequence[int],
    *,
    steps: int = SAMPLE_STEPS,
    guidance: float = GUIDANCE,
    controller: Any = None,
) -> torch.Tensor:
    """Sample one video per (prompt, seed) pair in one batch: `[B, 3, FRAMES, SIZE, SIZE]` float32
    on the CPU, in [-1, 1]. UniPC flow sampler, shift FLOW_SHIFT, CFG against the empty prompt."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not prompts:
        raise ValueError("generate needs at least one (prompt, seed) pair")
    device = next(model.parameters()).device
    noise = torch.cat([initial_noise((1, 3, FRAMES, SIZE, SIZE), seed, device=device) for seed in seeds])
    context = prompt_embeddings(prompts, device).to(model.dtype)
    negative = torch.zeros_like(context)
    with torch.no_grad():
        videos = sample_wan(model, noise, context, negative_embeds=negative, steps=steps, guidance=guidance,
                            shift=FLOW_SHIFT, controller=controller)
    return videos.float().clamp(-1, 1).cpu()
