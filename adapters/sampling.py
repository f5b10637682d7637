"""Transformer-only sampling loops on diffusers schedulers, driven by external text embeddings.

Each loop takes the initial noise (see `initial_noise`), runs the scheduler and returns the final
latents (fp32, the family's latent layout). With a `controller`, the loop installs it on the
model(s) for the run, pins each step's sigma (`InstalledSites.begin_step`) and removes it after.
`callback(step, total, sigma)` is called after every step.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable

import numpy as np
import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from . import cogvideox, hunyuan, wan

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


def hunyuan_scheduler(shift: float = 7.0) -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching Euler scheduler of the HunyuanVideo pipeline."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def cogvideox_scheduler(kind: str = "ddim", snr_shift_scale: float = 1.0):
    """CogVideoX's v-prediction zero-SNR scheduler: "ddim" (the pipeline's) or "dpm" (the demos').
    snr_shift_scale 1.0 for the 5B models, 3.0 for 2B."""
    classes = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}
    if kind not in classes:
        raise ValueError(f"CogVideoX scheduler must be one of {sorted(classes)}, got {kind!r}")
    return classes[kind](
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=True, prediction_type="v_prediction", rescale_betas_zero_snr=True,
        timestep_spacing="trailing", snr_shift_scale=snr_shift_scale,
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
    condition: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
    controller: Any = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Sample Wan2.1 (one transformer) or Wan2.2 A14B (`transformer` = high-noise expert used while
    the timestep >= boundary_ratio * 1000, then `low_noise_transformer` with `guidance_low`).

    noise `[B, C, T, H, W]`; prompt/negative embeddings `[B, N, text_dim]`. guidance 1 = one
    forward per step (distilled, few-step runs). I2V: `condition` `[B, C', T, H, W]` (mask and
    image latents) is concatenated to the latents on channels every step; `image_embeds` (Wan2.1
    I2V CLIP tokens) go to cross-attention. Wan2.2 TI2V's per-token timesteps are not used (T2V
    with it is the same computation)."""
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
            x = latents if condition is None else torch.cat([latents, condition.to(latents)], dim=1)
            x = x.to(model.dtype)
            timestep = t.expand(batch)
            pred = model(hidden_states=x, timestep=timestep, encoder_hidden_states=prompt_embeds,
                         encoder_hidden_states_image=image_embeds, return_dict=False)[0]
            if use_cfg and scale != 1.0:
                uncond = model(hidden_states=x, timestep=timestep, encoder_hidden_states=negative_embeds,
                               encoder_hidden_states_image=image_embeds, return_dict=False)[0]
                pred = uncond + scale * (pred - uncond)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
            if callback is not None:
                callback(i, steps, sigma)
    return latents


def sample_hunyuan(
    transformer: torch.nn.Module,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_embeds: torch.Tensor,
    *,
    prompt_mask: torch.Tensor | None = None,
    steps: int = 50,
    embedded_guidance: float = 6.0,
    shift: float = 7.0,
    controller: Any = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Sample HunyuanVideo T2V: flow Euler, one forward per step with the embedded (distilled)
    guidance. noise `[B, 16, T, H, W]`; prompt `[B, N, 4096]` (mask `[B, N]`, default all valid);
    pooled CLIP `[B, 768]`."""
    if noise.ndim != 5:
        raise ValueError(f"HunyuanVideo noise must be [B, C, T, H, W], got shape {tuple(noise.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if prompt_mask is None:
        prompt_mask = torch.ones(prompt_embeds.shape[:2], device=prompt_embeds.device)
    if prompt_mask.shape != prompt_embeds.shape[:2]:
        raise ValueError(f"prompt_mask {tuple(prompt_mask.shape)} does not match prompt_embeds {tuple(prompt_embeds.shape[:2])}")
    dtype = transformer.dtype
    scheduler = hunyuan_scheduler(shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device=noise.device)
    latents = noise.float()
    batch = latents.shape[0]
    guidance = torch.tensor([embedded_guidance] * batch, dtype=dtype, device=noise.device) * 1000.0
    prompt_embeds, prompt_mask, pooled_embeds = prompt_embeds.to(dtype), prompt_mask.to(dtype), pooled_embeds.to(dtype)
    with ExitStack() as stack:
        handles = _install_all(stack, hunyuan.install, (transformer,), controller)
        for i, t in enumerate(scheduler.timesteps):
            sigma = float(scheduler.sigmas[i])
            if handles:
                handles[id(transformer)].begin_step(sigma, i)
            pred = transformer(
                hidden_states=latents.to(dtype), timestep=t.expand(batch).to(latents.dtype),
                encoder_hidden_states=prompt_embeds, encoder_attention_mask=prompt_mask,
                pooled_projections=pooled_embeds, guidance=guidance, return_dict=False,
            )[0]
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
            if callback is not None:
                callback(i, steps, sigma)
    return latents


def sample_cogvideox(
    transformer: torch.nn.Module,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    negative_embeds: torch.Tensor | None = None,
    steps: int = 50,
    guidance: float = 6.0,
    scheduler: str = "ddim",
    snr_shift_scale: float = 1.0,
    seed: int = 0,
    controller: Any = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Sample CogVideoX1.5 T2V: DDIM or DPM (v-prediction), CFG as one batch-2 forward
    `[uncond, cond]`, RoPE built as the pipeline does. noise `[B, F, 16, H, W]` with F a multiple
    of patch_size_t (the pipeline pads, then drops the first padded latent frames itself); `seed`
    drives the DPM scheduler's noise. The sigma told to the controller is timestep / 1000."""
    if noise.ndim != 5:
        raise ValueError(f"CogVideoX noise must be [B, F, C, H, W], got shape {tuple(noise.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    patch_t = transformer.config.patch_size_t or 1
    if noise.shape[1] % patch_t:
        raise ValueError(f"CogVideoX latent frames {noise.shape[1]} must be a multiple of patch_size_t {patch_t}")
    use_cfg = _check_guidance(guidance, negative_embeds)
    dtype = transformer.dtype
    solver = cogvideox_scheduler(scheduler, snr_shift_scale)
    solver.set_timesteps(steps, device=noise.device)
    generator = torch.Generator(device=noise.device).manual_seed(seed)
    latents = (noise * solver.init_noise_sigma).to(dtype)
    context = torch.cat([negative_embeds, prompt_embeds]) if use_cfg else prompt_embeds
    context = context.to(dtype)
    rope = cogvideox.cogvideox_rope(transformer.config, noise.shape, device=noise.device)
    old_x0 = None
    with ExitStack() as stack:
        handles = _install_all(stack, cogvideox.install, (transformer,), controller)
        for i, t in enumerate(solver.timesteps):
            sigma = float(t) / solver.config.num_train_timesteps
            if handles:
                handles[id(transformer)].begin_step(sigma, i)
            x = torch.cat([latents] * 2) if use_cfg else latents
            x = solver.scale_model_input(x, t)
            pred = transformer(
                hidden_states=x, encoder_hidden_states=context, timestep=t.expand(x.shape[0]),
                image_rotary_emb=rope, return_dict=False,
            )[0].float()
            if use_cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance * (cond - uncond)
            if isinstance(solver, CogVideoXDPMScheduler):
                previous = solver.timesteps[i - 1] if i > 0 else None
                latents, old_x0 = solver.step(pred, old_x0, t, previous, latents, eta=0.0, generator=generator,
                                              return_dict=False)
            else:
                latents = solver.step(pred, t, latents, eta=0.0, generator=generator, return_dict=False)[0]
            latents = latents.to(dtype)
            if callback is not None:
                callback(i, steps, sigma)
    return latents.float()
