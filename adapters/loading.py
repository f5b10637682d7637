"""Offline loading of transformers and VAEs from the user's files, with configs shipped in configs/.

Supported inputs, per family:
- Wan2.1 / Wan2.2 transformers: single-file safetensors with original keys (`blocks.N.self_attn.q`,
  `head.modulation`, ...) or diffusers keys, with or without the `model.diffusion_model.` prefix,
  stored fp32/fp16/bf16/fp8_e4m3fn; ComfyUI "scaled fp8" files (`*.scale_weight` + `scaled_fp8`)
  are dequantised (w * scale); diffusers folders.
- HunyuanVideo T2V: the same single-file forms (original keys through our own split of the
  single-block `linear1`, whose width diffusers' converter hard-codes) and diffusers folders.
- CogVideoX1.5: diffusers folders, or single files with diffusers keys (no SAT checkpoints).
- VAEs: Wan2.1 (original or diffusers keys), HunyuanVideo and CogVideoX (diffusers keys), files or folders.
Family and variant come from the keys and shapes: the file must match a shipped config exactly.
The hub is never contacted. Anything else raises `LoadError` saying what was expected.
"""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")

TRANSFORMER_CLASSES = {
    "wan": "WanTransformer3DModel",
    "hunyuanvideo": "HunyuanVideoTransformer3DModel",
    "cogvideox": "CogVideoXTransformer3DModel",
}
VAE_CLASSES = {
    "wan": "AutoencoderKLWan",
    "hunyuanvideo": "AutoencoderKLHunyuanVideo",
    "cogvideox": "AutoencoderKLCogVideoX",
}


class LoadError(ValueError):
    """A file or folder that cannot be loaded as what was expected; the message says what was."""


@dataclass(frozen=True)
class Loaded:
    """A loaded model and what it was recognised as."""

    model: torch.nn.Module
    family: str  # "wan" | "hunyuanvideo" | "cogvideox"
    variant: str  # the shipped config's name, or "diffusers folder"
    source: str  # "single file (original keys)", "single file (diffusers keys)", "diffusers folder"


def shipped_config(variant: str) -> dict:
    """The config dict shipped as configs/<variant>/config.json."""
    path = CONFIG_DIR / variant / "config.json"
    if not path.is_file():
        raise LoadError(f"no shipped config for variant {variant!r}; known variants: {', '.join(shipped_variants())}")
    return json.loads(path.read_text())


def shipped_variants(class_name: str | None = None) -> list[str]:
    """Names of the shipped configs (of one diffusers class, if given)."""
    names = []
    for path in sorted(CONFIG_DIR.glob("*/config.json")):
        if class_name is None or json.loads(path.read_text()).get("_class_name") == class_name:
            names.append(path.parent.name)
    return names


def _diffusers_class(name: str):
    import diffusers

    return getattr(diffusers, name)


@contextmanager
def meta_parameters():
    """Parameters created inside live on the meta device (no memory, no init); buffers stay real."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build_empty(config: dict) -> torch.nn.Module:
    """The model of a config dict with parameters on the meta device and real buffers."""
    cls = _diffusers_class(config["_class_name"])
    with meta_parameters():
        return cls.from_config(config)


def _keeps_fp32(model: torch.nn.Module, key: str) -> bool:
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    return any(part in key.split(".") for part in keep)


def materialise(model: torch.nn.Module, state: dict | None, *, dtype: torch.dtype, device) -> torch.nn.Module:
    """Give a `build_empty` model its parameters: `state` (exact key set required), or random
    N(0, 0.02) values when `state` is None (benchmarks). Parameters go to `dtype` except the
    model's keep-in-fp32 modules, as diffusers' from_pretrained does."""
    names = dict(model.named_parameters())
    if state is not None:
        missing, unexpected = sorted(set(names) - set(state)), sorted(set(state) - set(names))
        if missing or unexpected:
            raise LoadError(
                f"weights do not fit {type(model).__name__}: {len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
    for name, param in names.items():
        target = torch.float32 if _keeps_fp32(model, name) else dtype
        if state is None:
            value = torch.empty(param.shape, dtype=target, device=device).normal_(0.0, 0.02)
        else:
            value = state[name]
            if tuple(value.shape) != tuple(param.shape):
                raise LoadError(f"weight {name} has shape {tuple(value.shape)}, {type(model).__name__} expects {tuple(param.shape)}")
            value = value.to(device=device, dtype=target)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    return model.to(device).eval()


# ----------------------------------------------------------------------------- reading files


def read_safetensors(path: Path, device="cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; LoadError when it is not one or is damaged."""
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise LoadError(f"{path.name}: expected a .safetensors file (other formats are not loaded)")
    try:
        return load_file(str(path), device=str(device))
    except Exception as error:  # safetensors raises its own error type for damaged files
        raise LoadError(f"{path.name}: could not read as safetensors ({error}); the file may be truncated or damaged") from error


def strip_prefix(state: dict) -> dict:
    """Drop a ComfyUI/original `model.diffusion_model.` (or similar) prefix common to the keys."""
    for prefix in PREFIXES:
        if state and all(key.startswith(prefix) for key in state if key != "scaled_fp8"):
            return {key[len(prefix):] if key.startswith(prefix) else key: v for key, v in state.items()}
    return state


def dequantise_scaled_fp8(state: dict, dtype: torch.dtype = torch.float32) -> dict:
    """ComfyUI "scaled fp8" -> weights `w * scale_weight` (computed in float32, stored as `dtype`);
    other quantised layouts are refused."""
    if any(key.endswith(("weight_scale", "comfy_quant")) for key in state):
        raise LoadError("this file uses ComfyUI's mixed-precision quantisation (weight_scale / comfy_quant keys), "
                        "which is not supported; use an fp16, bf16, fp8 or scaled-fp8 file")
    scales = [key for key in state if key.endswith(".scale_weight")]
    if not scales and "scaled_fp8" not in state:
        return state
    if not scales:
        raise LoadError("file has a scaled_fp8 marker but no .scale_weight keys: damaged or an unknown fp8 layout")
    out = {k: v for k, v in state.items() if k != "scaled_fp8" and not k.endswith((".scale_weight", ".scale_input"))}
    for key in scales:
        weight_key = key[: -len(".scale_weight")] + ".weight"
        if weight_key not in out:
            raise LoadError(f"scaled fp8: {key} has no weight {weight_key}")
        weight, scale = out[weight_key], state[key].float()
        if scale.numel() != 1 and (scale.ndim != weight.ndim or any(s not in (1, w) for s, w in zip(scale.shape, weight.shape))):
            raise LoadError(f"scaled fp8: scale of {weight_key} has shape {tuple(scale.shape)}, which does not "
                            f"broadcast onto the weight {tuple(weight.shape)}; refusing rather than loading wrong weights")
        out[weight_key] = (weight.float() * (scale.reshape(()) if scale.numel() == 1 else scale)).to(dtype)
    return out


# ----------------------------------------------------------------------------- transformers


def detect_transformer_family(state: dict) -> tuple[str, bool]:
    """(family, has_original_keys) from the key names of a prefix-stripped state dict."""
    keys = state.keys()
    if "head.modulation" in keys:
        return "wan", True
    if any(k.startswith(("vace_blocks.", "motion_encoder.", "face_adapter.")) for k in keys):
        raise LoadError("Wan VACE / Animate checkpoints are not supported (expected a Wan T2V, I2V or TI2V transformer)")
    if "condition_embedder.time_proj.weight" in keys and "blocks.0.attn1.to_q.weight" in keys:
        return "wan", False
    if any(k.startswith("txt_in.individual_token_refiner.") for k in keys) and "img_in.proj.weight" in keys:
        return "hunyuanvideo", True
    if "context_embedder.token_refiner.refiner_blocks.0.attn.to_q.weight" in keys:
        return "hunyuanvideo", False
    if "patch_embed.proj.weight" in keys and "transformer_blocks.0.attn1.to_q.weight" in keys:
        return "cogvideox", False
    if any(k.startswith(("decoder.", "encoder.")) for k in keys):
        raise LoadError("this is a VAE checkpoint, not a transformer; load it with load_vae")
    if any("mixins." in k for k in keys):
        raise LoadError("CogVideoX SAT checkpoints are not supported: use the diffusers-format transformer")
    raise LoadError("unrecognised checkpoint: expected a Wan2.1/2.2, HunyuanVideo or CogVideoX1.5 video transformer "
                    f"(first keys: {sorted(keys)[:4]})")


def _split_hunyuan_single_linear1(state: dict) -> dict:
    """Split original single-block `linear1` (q | k | v | mlp) using the checkpoint's own width,
    into diffusers keys; diffusers' converter then maps the remaining original keys."""
    hidden = state["img_in.proj.weight"].shape[0]
    out = {}
    for key, value in state.items():
        if key.startswith("single_blocks.") and key.rsplit(".", 2)[-2] == "linear1":
            block, kind = key[len("single_blocks."):].split(".linear1.")
            base = f"single_transformer_blocks.{block}"
            q, k, v, mlp = torch.split(value, [hidden, hidden, hidden, value.shape[0] - 3 * hidden], dim=0)
            for name, part in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
                out[f"{base}.{name}.{kind}"] = part
        else:
            out[key] = value
    return out


def to_diffusers_keys(family: str, state: dict) -> dict:
    """Original (Wan / HunyuanVideo) keys -> diffusers keys."""
    from diffusers.loaders import single_file_utils as convert

    if family == "wan":
        return convert.convert_wan_transformer_to_diffusers(dict(state))
    if family == "hunyuanvideo":
        return convert.convert_hunyuan_video_transformer_to_diffusers(_split_hunyuan_single_linear1(state))
    raise LoadError(f"no original-key conversion for {family}")


@functools.lru_cache(maxsize=None)
def _parameter_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a shipped config's model (built on the meta device, cached)."""
    config = shipped_config(variant)
    with torch.device("meta"):
        model = _diffusers_class(config["_class_name"]).from_config(config)
    return {k: tuple(p.shape) for k, p in model.named_parameters()}


def match_variant(class_name: str, state: dict) -> str:
    """The shipped config whose parameter names and shapes equal those of `state`."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for variant in shipped_variants(class_name):
        if _parameter_shapes(variant) == shapes:
            return variant
    candidates = ", ".join(shipped_variants(class_name))
    raise LoadError(f"the {class_name} weights match none of the shipped configs ({candidates}); "
                    "the file may be damaged, partial or of an unsupported variant")


def load_transformer(path, *, dtype: torch.dtype = torch.bfloat16, device="cpu") -> Loaded:
    """Load a video transformer from a .safetensors file or a diffusers folder, offline."""
    return _load(path, TRANSFORMER_CLASSES, "transformer", dtype, device, _prepare_transformer)


def _prepare_transformer(state: dict, dtype) -> tuple[str, dict, bool]:
    state = dequantise_scaled_fp8(state, dtype)  # straight to the device
    family, original = detect_transformer_family(state)
    return family, to_diffusers_keys(family, state) if original else state, original


def _load(path, classes: dict, subfolder: str, dtype, device, prepare) -> Loaded:
    """A diffusers folder, or a single .safetensors file whose prefix-stripped state `prepare(state,
    dtype)` turns into (family, diffusers-keyed state, had original keys)."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, classes, subfolder, dtype, device)
    if not path.is_file():
        raise LoadError(f"{path}: no such file or folder")
    family, state, original = prepare(strip_prefix(read_safetensors(path, device)), dtype)
    variant = match_variant(classes[family], state)
    model = materialise(build_empty(shipped_config(variant)), state, dtype=dtype, device=device)
    return Loaded(model, family, variant, "single file (original keys)" if original else "single file (diffusers keys)")


def _load_folder(path: Path, classes: dict, subfolder: str, dtype, device) -> Loaded:
    """A diffusers model folder (config.json + weights), or a pipeline folder holding `subfolder`."""
    if not (path / "config.json").is_file() and (path / subfolder / "config.json").is_file():
        path = path / subfolder
    config_path = path / "config.json"
    if not config_path.is_file():
        raise LoadError(f"{path}: expected a diffusers folder with config.json (or {subfolder}/config.json)")
    class_name = json.loads(config_path.read_text()).get("_class_name")
    family = {v: k for k, v in classes.items()}.get(class_name)
    if family is None:
        raise LoadError(f"{config_path}: class {class_name!r} is not one of {sorted(classes.values())}")
    try:
        model = _diffusers_class(class_name).from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise LoadError(f"{path}: could not load the {class_name} weights ({error})") from error
    return Loaded(model.to(device).eval(), family, "diffusers folder", "diffusers folder")


# ----------------------------------------------------------------------------- VAEs


def detect_vae_family(state: dict) -> tuple[str, bool]:
    """(family, has_original_keys) of a prefix-stripped VAE state dict."""
    keys = state.keys()
    if "decoder.middle.0.residual.0.gamma" in keys:
        return "wan", True
    if "decoder.mid_block.resnets.0.norm1.gamma" in keys:
        return "wan", False
    if "decoder.conv_in.conv.weight" in keys:  # CogVideoX's decoder has spatial norms (norm_layer)
        return ("cogvideox" if any(".norm_layer." in k for k in keys) else "hunyuanvideo"), False
    raise LoadError("unrecognised VAE checkpoint: expected a Wan2.1, HunyuanVideo or CogVideoX video VAE "
                    f"(first keys: {sorted(keys)[:4]})")


def load_vae(path, *, dtype: torch.dtype = torch.float32, device="cpu") -> Loaded:
    """Load a video VAE from a .safetensors file or a diffusers folder, offline."""
    return _load(path, VAE_CLASSES, "vae", dtype, device, _prepare_vae)


def _prepare_vae(state: dict, dtype) -> tuple[str, dict, bool]:
    family, original = detect_vae_family(state)
    if original:
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        state = convert_wan_vae_to_diffusers(dict(state))
    return family, state, original


def decode_video(vae: torch.nn.Module, latents: torch.Tensor, family: str, *, tiled: bool = True) -> torch.Tensor:
    """Sampled latents -> frames `[B, 3, F, H, W]`, nominally in [-1, 1] (not clamped), undoing the family's latent
    normalisation (Wan mean/std, HunyuanVideo and CogVideoX scaling factor; CogVideoX latents are
    `[B, F, C, H, W]`). `tiled` decodes in overlapping tiles to bound memory."""
    if tiled:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    config = vae.config
    latents = latents.to(dtype=vae.dtype, device=vae.device)
    if family == "wan":
        mean = torch.tensor(config.latents_mean, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(config.latents_std, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1, 1)
        latents = latents * std + mean
    elif family == "hunyuanvideo":
        latents = latents / config.scaling_factor
    elif family == "cogvideox":
        latents = latents.permute(0, 2, 1, 3, 4) / config.scaling_factor
    else:
        raise ValueError(f"family must be one of wan, hunyuanvideo, cogvideox, got {family!r}")
    with torch.no_grad():
        return vae.decode(latents, return_dict=False)[0]
