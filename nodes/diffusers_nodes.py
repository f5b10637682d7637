"""V3 nodes of the diffusers path (CogVideoX1.5, and Wan / HunyuanVideo without ComfyUI's model
classes): Load Model, Sampler, Decode. Loading, sampling and decoding are adapters' work; these
nodes parse inputs, place the model on ComfyUI's device and report progress / honour Cancel.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import comfy.model_management as mm
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io, ui

from ..adapters import loading, sampling
from . import latent_convention, strategy_store
from .search_node import search_and_save, search_budget_inputs, search_outputs
from .sockets import CATEGORY, Strategy

DiffusersModel = io.Custom("SPARSE_VDIT_DIFFUSERS_MODEL")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DIFFUSERS_PREFIX = "diffusers/"


def model_choices(kind: str) -> list[str]:
    """Files of a ComfyUI model folder plus diffusers folders (models/diffusers/<name>)."""
    names = list(folder_paths.get_filename_list(kind))
    for root in folder_paths.get_folder_paths("diffusers"):
        if os.path.isdir(root):
            names += sorted(DIFFUSERS_PREFIX + d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    return names


def model_path(kind: str, name: str) -> str:
    """Full path of a choice from :func:`model_choices` (LoadError when it is gone)."""
    if name.startswith(DIFFUSERS_PREFIX):
        for root in folder_paths.get_folder_paths("diffusers"):
            path = os.path.join(root, name[len(DIFFUSERS_PREFIX):])
            if os.path.isdir(path):
                return path
    else:
        path = folder_paths.get_full_path(kind, name)
        if path is not None:
            return path
    raise loading.LoadError(f"'{name}' not found in models/{kind} or models/diffusers")


@contextmanager
def on_compute_device(model: torch.nn.Module):
    """The model on ComfyUI's torch device for the block (room made first), offloaded after."""
    device = mm.get_torch_device()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    mm.free_memory(size * 1.2, device)
    model.to(device)
    try:
        yield device
    finally:
        model.to(mm.unet_offload_device())
        mm.soft_empty_cache()


class LoadDiffusersModel(io.ComfyNode):
    """A Wan / HunyuanVideo / CogVideoX1.5 transformer through diffusers (offline, shipped configs)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseVDiTLoadModel",
            display_name="Load Video Model (diffusers)",
            category=CATEGORY,
            description="Load a video transformer from models/diffusion_models (single file) or "
                        "models/diffusers (folder) for the Sparse-vDiT sampler; needed for CogVideoX1.5.",
            inputs=[
                io.Combo.Input("model_name", options=model_choices("diffusion_models"),
                               tooltip="A transformer file (Wan, HunyuanVideo) or a diffusers folder (any family)."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="bf16",
                               tooltip="Compute dtype of the weights (fp32 on CPU)."),
            ],
            outputs=[DiffusersModel.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model_name, weight_dtype="bf16"):
        loaded = loading.load_transformer(model_path("diffusion_models", model_name), dtype=DTYPES[weight_dtype],
                                          device=mm.unet_offload_device())
        return io.NodeOutput(loaded)


def _embeds(conditioning, what: str) -> tuple[torch.Tensor, dict]:
    if not conditioning or not isinstance(conditioning[0], (list, tuple)) or len(conditioning[0]) < 2:
        raise ValueError(f"{what} must be a CONDITIONING from a text encoder node")
    return conditioning[0][0], conditioning[0][1]


def noise_shape(family: str, transformer: torch.nn.Module, batch: int, frames: int, height: int, width: int):
    """Latent noise shape of a video of ``frames`` x ``height`` x ``width`` pixels (VAE stride 4, 8, 8)."""
    if (frames - 1) % 4 or height % 16 or width % 16:
        raise ValueError(f"frames must be 4k+1 and height/width multiples of 16, got {frames} x {height} x {width}")
    latent_frames = (frames - 1) // 4 + 1
    channels = transformer.config.in_channels
    if family == "cogvideox":
        pt = transformer.config.patch_size_t or 1
        latent_frames = -(-latent_frames // pt) * pt
        return (batch, latent_frames, channels, height // 8, width // 8)
    return (batch, channels, latent_frames, height // 8, width // 8)


class DiffusersSampler(io.ComfyNode):
    """Sample with our diffusers samplers (stock-exact), optionally with a sparse strategy."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseVDiTSampler",
            display_name="Sparse Video Sampler (diffusers)",
            category=CATEGORY,
            description="Text-to-video with the model's own scheduler (Wan UniPC, HunyuanVideo flow "
                        "Euler, CogVideoX DDIM); outputs a LATENT in ComfyUI's convention.",
            inputs=[
                DiffusersModel.Input("model", tooltip="From Load Video Model (diffusers)."),
                io.Conditioning.Input("positive", tooltip="Prompt from a text encoder node (umt5 for Wan, "
                                      "llava-llama3 + clip_l for HunyuanVideo, t5xxl for CogVideoX)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt (unused by HunyuanVideo)."),
                io.Int.Input("width", default=832, min=16, max=4096, step=16, tooltip="Video width in pixels."),
                io.Int.Input("height", default=480, min=16, max=4096, step=16, tooltip="Video height in pixels."),
                io.Int.Input("frames", default=81, min=1, max=1025, step=4, tooltip="Frame count (4k+1)."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Sampling steps."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Guidance scale (HunyuanVideo: embedded guidance)."),
                io.Float.Input("shift", default=5.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Flow shift (Wan 5 at 720p / 3 at 480p, HunyuanVideo 7; CogVideoX: unused)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Noise seed."),
                Strategy.Input("strategy", optional=True, tooltip="Optional sparse strategy; none = dense."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional empty LATENT: its shape replaces width/height/frames."),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, model, positive, negative, width, height, frames, steps, cfg, shift, seed,
                strategy=None, latent=None):
        controller = None
        if strategy is not None:
            from ..strategies.engine import SparseEngine

            controller = SparseEngine(strategy)
        bar = comfy.utils.ProgressBar(steps)
        shape = latent_shape(model, latent, frames, height, width)
        samples = sample(model, positive, negative, shape, steps=steps, cfg=cfg, shift=shift, seed=seed,
                         controller=controller, progress=lambda done, total: bar.update_absolute(done, total))
        return io.NodeOutput({"samples": samples, "sparse_vdit_family": model.family})


def latent_shape(model, latent, frames: int, height: int, width: int) -> tuple:
    """Noise shape from an optional LATENT, else from the pixel size."""
    if latent is not None:
        return tuple(latent_convention.from_comfy(latent["samples"], model.family).shape)
    return noise_shape(model.family, model.model, 1, frames, height, width)


def sample(model, positive, negative, shape, *, steps, cfg, shift, seed, controller=None, progress=None):
    """One run of the family's diffusers sampler on ComfyUI's device; LATENT samples (raw) out.
    ``progress(done, total)`` after each step; Cancel is honoured between steps."""
    prompt, extra = _embeds(positive, "positive")
    negative_prompt, _ = _embeds(negative, "negative")
    transformer, family = model.model, model.family

    def callback(step, total, sigma):
        if progress is not None:
            progress(step + 1, total)
        mm.throw_exception_if_processing_interrupted()

    with on_compute_device(transformer) as device, torch.inference_mode():
        noise = sampling.initial_noise(shape, seed, device=device)
        prompt, negative_prompt = prompt.to(device), negative_prompt.to(device)
        common = dict(steps=steps, controller=controller, callback=callback)
        if family == "wan":
            out = sampling.sample_wan(transformer, noise, prompt, negative_embeds=negative_prompt,
                                      guidance=cfg, shift=shift, **common)
        elif family == "hunyuanvideo":
            pooled = extra.get("pooled_output")
            if pooled is None:
                raise ValueError("HunyuanVideo needs a CONDITIONING with a pooled CLIP output "
                                 "(DualCLIPLoader type hunyuan_video + CLIPTextEncode)")
            out = sampling.sample_hunyuan(transformer, noise, prompt, pooled.to(device),
                                          embedded_guidance=cfg, shift=shift, **common)
        else:
            out = sampling.sample_cogvideox(transformer, noise, prompt, negative_embeds=negative_prompt,
                                            guidance=cfg, seed=seed, **common)
    return latent_convention.to_comfy(out.float(), family).to(mm.intermediate_device())


def step_sigmas(family: str, steps: int, shift: float) -> list[float]:
    """The sigma each step of our ``family`` sampler reports to the controller (search buckets)."""
    if family == "wan":
        scheduler = sampling.wan_scheduler(shift)
        scheduler.set_timesteps(steps)
        return [float(s) for s in scheduler.sigmas[:steps]]
    if family == "hunyuanvideo":
        scheduler = sampling.hunyuan_scheduler(shift)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
        return [float(s) for s in scheduler.sigmas[:steps]]
    scheduler = sampling.cogvideox_scheduler("ddim")
    scheduler.set_timesteps(steps)
    return [float(t) / scheduler.config.num_train_timesteps for t in scheduler.timesteps]


class DiffusersSearch(io.ComfyNode):
    """Search a strategy through our diffusers sampler (CogVideoX1.5, or any diffusers-path model)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseVDiTSearchDiffusers",
            display_name="Search Sparse Strategy (diffusers)",
            category=CATEGORY,
            description="Like Search Sparse Strategy, for a model from Load Video Model (diffusers).",
            inputs=[
                DiffusersModel.Input("model", tooltip="From Load Video Model (diffusers)."),
                io.Conditioning.Input("positive", tooltip="Calibration prompt (patterns depend little on it)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt (unused by HunyuanVideo)."),
                io.Int.Input("width", default=1360, min=16, max=4096, step=16, tooltip="Video width in pixels."),
                io.Int.Input("height", default=768, min=16, max=4096, step=16, tooltip="Video height in pixels."),
                io.Int.Input("frames", default=81, min=1, max=1025, step=4, tooltip="Frame count (4k+1)."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Sampling steps (as you will generate)."),
                io.Float.Input("cfg", default=6.0, min=0.0, max=100.0, step=0.1, tooltip="Guidance scale."),
                io.Float.Input("shift", default=5.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Flow shift (Wan, HunyuanVideo; unused by CogVideoX)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Noise seed."),
                *search_budget_inputs(),
            ],
            outputs=search_outputs(),
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, positive, negative, width, height, frames, steps, cfg, shift, seed,
                budget, value, filename_prefix, resume=True):
        from ..strategies.file import model_fingerprint

        config = model.model.config
        layers = config.num_layers + getattr(config, "num_single_layers", 0)
        fingerprint = model_fingerprint(model.model, layers=layers, heads=config.num_attention_heads,
                                        head_dim=config.attention_head_dim, family=model.family,
                                        variant=model.variant)
        shape = noise_shape(model.family, model.model, 1, frames, height, width)
        schedule = step_sigmas(model.family, steps, shift)

        def run(controller):
            return sample(model, positive, negative, shape, steps=steps, cfg=cfg, shift=shift, seed=seed,
                          controller=controller)

        result, name = search_and_save(run, schedule, layers, budget=budget, value=value, seed=seed,
                                       filename_prefix=filename_prefix, resume=resume,
                                       meta={"model": fingerprint, "schedule": {"steps": steps, "cfg": cfg,
                                                                                "shift": shift}})
        dense = result.dense_latents if result.dense_latents is not None else run(None)
        info = (f"saved models/{strategy_store.FOLDER}/{name}: predicted attention speedup "
                f"{result.selection.predicted_speedup:.2f}x, predicted error {result.selection.predicted_error:.4g}")
        return io.NodeOutput(result.strategy, {"samples": dense, "sparse_vdit_family": model.family}, info,
                             ui=ui.PreviewText(info))


class DiffusersDecode(io.ComfyNode):
    """Decode a video LATENT with a diffusers VAE (CogVideoX1.5, or any family)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseVDiTDecode",
            display_name="Decode Video (diffusers VAE)",
            category=CATEGORY,
            description="Decode with a Wan2.1 / HunyuanVideo / CogVideoX VAE from models/vae or "
                        "models/diffusers (Wan and HunyuanVideo LATENTs also work with VAE Decode).",
            inputs=[
                io.Latent.Input("latent", tooltip="A video LATENT (from the Sparse Video Sampler or KSampler)."),
                io.Combo.Input("vae_name", options=model_choices("vae"),
                               tooltip="The VAE file or diffusers folder of the same family."),
                io.Boolean.Input("tiled", default=True, tooltip="Decode in tiles to bound memory."),
            ],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, latent, vae_name, tiled=True):
        vae = loading.load_vae(model_path("vae", vae_name), device=mm.unet_offload_device())
        family = latent.get("sparse_vdit_family", vae.family)
        if family != vae.family:
            raise ValueError(f"this LATENT is from a {family} model but {vae_name} is a {vae.family} VAE")
        with on_compute_device(vae.model), torch.inference_mode():
            video = loading.decode_video(vae.model, latent_convention.from_comfy(latent["samples"], family),
                                         family, tiled=tiled)
        # [B, 3, F, H, W] in [-1, 1] -> IMAGE frames [B*F, H, W, 3] in [0, 1]
        frames = video.float().permute(0, 2, 3, 4, 1).flatten(0, 1)
        return io.NodeOutput(((frames + 1) / 2).clamp(0, 1).to(mm.intermediate_device()))


NODES = [LoadDiffusersModel, DiffusersSampler, DiffusersDecode, DiffusersSearch]
