"""Transformer-only sampling loops on diffusers schedulers, driven by external text embeddings.

Each loop takes the initial noise (see `initial_noise`), runs the scheduler and returns the final
latents (fp32, the family's latent layout). With a `controller`, the loop installs it on the
model(s) for the run, pins each step's sigma (`InstalledSites.begin_step`) and removes it after.
`callback(step, total, sigma)` is called after every step.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable

import torch
from diffusers import UniPCMultistepScheduler

from . import wan

Callback = Callable[[int, int, float], None]


def initial_noise(shape, seed: int, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Seeded standard-normal latents, drawn on the CPU so every device gets the same values."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def wan_scheduler(shift: float) -> UniPCMultistepScheduler:
    """The UniPC flow-matching scheduler of the Wan pipelines (shift 3 for 480p, 5 for 720p)."""
    return UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
        final_sigmas_type="zero", timestep_spacing="linspace",
    )


def _check_guidance(guidance: float, negative) -> bool:
    """True when classifier-free guidance needs an unconditional forward."""
    if guidance != 1.0 and negative is None:
        raise ValueError(f"guidance {guidance} != 1 needs negative (unconditional) embeddings")
    return guidance != 1.0


def _install_all(stack: ExitStack, install: Callable, models, controller) -> dict[int, Any]:
    """Install `controller` on each distinct model for the duration of `stack`; id(model) -> handle."""
    handles = {}
    if controller is not None:
        for model in models:
            if model is not None and id(model) not in handles:
                handles[id(model)] = stack.enter_context(install(model, controller))
    return handles


def sample_wan(
    transformer: torch.nn.Module,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    negative_embeds: torch.Tensor | None = None,
    steps: int = 50,
    guidance: float = 5.0,
    shift: float = 5.0,
    low_noise_transformer: torch.nn.Module | None = None,
    boundary_ratio: float = 0.875,
    guidance_low: float | None = None,
    controller: Any = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Sample Wan2.1 (one transformer) or Wan2.2 A14B (`transformer` = high-noise expert used while
    the timestep >= boundary_ratio * 1000, then `low_noise_transformer` with `guidance_low`).

    noise `[B, C, T, H, W]`; prompt/negative embeddings `[B, N, text_dim]`. guidance 1 = one
    forward per step (distilled, few-step runs)."""
    if noise.ndim != 5:
        raise ValueError(f"Wan noise must be [B, C, T, H, W], got shape {tuple(noise.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    guidance_low = guidance if guidance_low is None else guidance_low
    use_cfg = _check_guidance(guidance, negative_embeds) or _check_guidance(guidance_low, negative_embeds)
    scheduler = wan_scheduler(shift)
    scheduler.set_timesteps(steps, device=noise.device)
    scheduler.set_begin_index(0)
    boundary = boundary_ratio * scheduler.config.num_train_timesteps
    latents = noise.float()
    batch = latents.shape[0]
    with ExitStack() as stack:
        handles = _install_all(stack, wan.install, (transformer, low_noise_transformer), controller)
        for i, t in enumerate(scheduler.timesteps):
            high = low_noise_transformer is None or t >= boundary
            model = transformer if high else low_noise_transformer
            scale = guidance if high else guidance_low
            sigma = float(scheduler.sigmas[i])
            if handles:
                handles[id(model)].begin_step(sigma, i)
            x = latents.to(model.dtype)
            timestep = t.expand(batch)
            pred = model(hidden_states=x, timestep=timestep, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            if use_cfg and scale != 1.0:
                uncond = model(
                    hidden_states=x, timestep=timestep, encoder_hidden_states=negative_embeds, return_dict=False
                )[0]
                pred = uncond + scale * (pred - uncond)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
            if callback is not None:
                callback(i, steps, sigma)
    return latents
