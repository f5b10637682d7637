"""The attention override installed on a ComfyUI MODEL, written without any comfy import.

ComfyUI calls ``transformer_options["optimized_attention_override"]`` as
``override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
skip_output_reshape=False, transformer_options=..., _inside_attn_wrapper=True)`` for every
attention call of the model. This module turns such a call into one call of the sparse
controller (``strategies.engine.SparseEngine`` or anything with its ``attention`` method)
or passes it through unchanged to the dense path (the previously installed override, if any,
else ``func``).

Per call it needs the layer index, the sigma and the token grid. They come from, in order:
``transformer_options["block_index"]/["block_type"]`` (newer ComfyUI) or our own per-block tag
(``BlockTag``, older ComfyUI) or a per-forward call counter (families without block hooks);
``transformer_options["grid_sizes"]`` or the grid our ``ForwardWrapper`` derives from the latent;
the sigma our wrapper reads once per forward (``transformer_options["sigmas"]`` as fallback).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..strategies.geometry import VideoGeometry

log = logging.getLogger(__name__)

OVERRIDE_KEY = "optimized_attention_override"
LAYER_KEY = "sparse_vdit_layer"      # flat layer index tagged by our per-block patch
FORWARD_KEY = "sparse_vdit_forward"  # per-forward state set by our diffusion-model wrapper
WRAPPER_KEY = "sparse_vdit"          # key of our wrappers / callbacks on the ModelPatcher


@dataclass(frozen=True)
class ModelFamily:
    """Where a model family keeps its blocks and its non-grid tokens.

    extra_at: "prefix" when non-grid tokens come before the video (CogVideoX text, Wan
    reference latents), "suffix" when after (HunyuanVideo text). count_calls: the family has no
    block hook, so the layer index is the order of self-attention calls in one forward.
    """

    name: str
    extra_at: str
    double_blocks: str
    single_blocks: str | None = None
    count_calls: bool = False
    text_arg: int | None = None          # forward's positional arg holding the text tokens [B, T, C]
    extra_frames_arg: int | None = None  # forward's positional arg of latent frames joined to x (Wan)


FAMILIES = {
    "wan": ModelFamily("wan", "prefix", "blocks", extra_frames_arg=4),
    "hunyuan_video": ModelFamily("hunyuan_video", "suffix", "double_blocks", "single_blocks", text_arg=2),
    "cogvideox": ModelFamily("cogvideox", "prefix", "transformer_blocks", count_calls=True),
}


def family_of(diffusion_model: Any) -> ModelFamily:
    """The family of a ComfyUI diffusion model, from its class name (ValueError if unsupported)."""
    names = [c.__name__.lower() for c in type(diffusion_model).__mro__]
    for name in names:
        if name.startswith("wan") or name.endswith("wanmodel"):
            return FAMILIES["wan"]
        if name.startswith("hunyuanvideo"):
            return FAMILIES["hunyuan_video"]
        if name.startswith("cogvideox"):
            return FAMILIES["cogvideox"]
    raise ValueError(
        f"Sparse-vDiT supports Wan2.x, HunyuanVideo and CogVideoX models; "
        f"this MODEL is a {type(diffusion_model).__name__}"
    )


def sets_block_index(diffusion_model: Any) -> bool:
    """Whether this ComfyUI's model code puts ``block_index`` in transformer_options itself
    (newer Wan / HunyuanVideo), so no per-block tag patches are needed."""
    try:
        source = inspect.getsource(type(diffusion_model).forward_orig)
    except (AttributeError, OSError, TypeError):
        return False
    return '"block_index"' in source or "'block_index'" in source


def block_counts(diffusion_model: Any, family: ModelFamily) -> tuple[int, int]:
    """(double/plain blocks, single blocks) of the model; flat layer = double i, n_double + j."""
    n_double = len(getattr(diffusion_model, family.double_blocks))
    n_single = len(getattr(diffusion_model, family.single_blocks)) if family.single_blocks else 0
    return n_double, n_single


class ForwardState:
    """What our wrapper learns once per forward: the grid (frames, rows, columns), sigma and,
    where the family says, the text length (HunyuanVideo: text after the video, reference
    latent tokens before it)."""

    __slots__ = ("grid", "sigma", "text", "calls")

    def __init__(self, grid: tuple[int, int, int], sigma: float | None, text: int | None = None):
        self.grid = grid
        self.sigma = sigma
        self.text = text
        self.calls = 0


def latent_grid(latent_shape: tuple[int, ...], patch_size: Any) -> tuple[int, int, int]:
    """Token grid (T/pt, H/ph, W/pw), rounded up, of a (B, C, T, H, W) latent."""
    if len(latent_shape) != 5:
        raise ValueError(f"expected a (B, C, T, H, W) video latent, got shape {tuple(latent_shape)}")
    if isinstance(patch_size, int):
        patch_size = (1, patch_size, patch_size)
    pt, ph, pw = (int(p) for p in patch_size)
    t, h, w = latent_shape[2:]
    return math.ceil(t / pt), math.ceil(h / ph), math.ceil(w / pw)


def _first_sigma(transformer_options: dict) -> float | None:
    sigmas = transformer_options.get("sigmas")
    if sigmas is None:
        return None
    return float(sigmas.reshape(-1)[0]) if hasattr(sigmas, "reshape") else float(sigmas[0])


@torch.compiler.disable
def forward_state(family: ModelFamily, model_args: tuple, options: dict, patch_size: Any) -> ForwardState:
    """Grid, sigma and text length of one forward. Kept out of torch.compile (TorchCompileModel):
    reading the sigma as a float would otherwise guard, and recompile, on every step's value."""
    def positional(index):
        return model_args[index] if index is not None and index < len(model_args) else None

    shape = list(model_args[0].shape)
    joined = positional(family.extra_frames_arg)
    if joined is not None:
        shape[2] += joined.shape[2]
    text = positional(family.text_arg)
    return ForwardState(latent_grid(tuple(shape), patch_size), _first_sigma(options),
                        None if text is None else int(text.shape[1]))


class ForwardWrapper:
    """WrappersMP.DIFFUSION_MODEL wrapper: records grid, sigma and text length per forward.

    ComfyUI calls it as ``wrapper(executor, x, timestep, context, ..., transformer_options, **kw)``;
    transformer_options is the last positional argument (or a keyword).
    """

    def __init__(self, family: ModelFamily):
        self.family = family

    def __call__(self, executor: Callable, *args: Any, **kwargs: Any) -> Any:
        if "transformer_options" in kwargs:
            options, model_args = kwargs["transformer_options"], args
        else:
            options, model_args = args[-1], args[:-1]
        state = forward_state(self.family, model_args, options, executor.class_obj.patch_size)
        tagged = {**options, FORWARD_KEY: state}
        if "transformer_options" in kwargs:
            kwargs["transformer_options"] = tagged
        else:
            args = (*args[:-1], tagged)
        return executor(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> "ForwardWrapper":
        return self


class BlockTag:
    """patches_replace["dit"] patch that tags the block's attention calls with its flat layer index.

    Used on ComfyUI versions that do not set ``block_index``; chains a patch already installed
    for the same block.
    """

    def __init__(self, layer: int, previous: Callable | None = None):
        self.layer = layer
        self.previous = previous

    # Not compiled itself (one instance per block would recompile per block); the block it calls is.
    @functools.partial(torch.compiler.disable, recursive=False)
    def __call__(self, args: dict, extra: dict) -> dict:
        tagged = {**args, "transformer_options": {**args["transformer_options"], LAYER_KEY: self.layer}}
        if self.previous is not None:
            return self.previous(tagged, extra)
        return extra["original_block"](tagged)

    def __deepcopy__(self, memo: dict) -> "BlockTag":
        return self


class SparseAttentionOverride:
    """The ``optimized_attention_override``: sparse self-attention, everything else dense.

    controller: an object with SparseEngine's ``attention`` method; previous: the override that
    was installed before ours (the dense path chains through it), or None.
    """

    def __init__(self, controller: Any, family: ModelFamily, n_double: int,
                 previous: Callable | None = None):
        self.controller = controller
        self.family = family
        self.n_double = n_double
        self.previous = previous
        self._warned = False

    def on_top_of(self, current: Callable | None) -> "SparseAttentionOverride":
        """This override re-stacked on ``current`` (itself if current already is this one)."""
        if current is None or current is self:
            return self
        if isinstance(current, SparseAttentionOverride) and current.controller is self.controller:
            return current  # already on top (restacked on an earlier step)
        return SparseAttentionOverride(self.controller, self.family, self.n_double, current)

    def __deepcopy__(self, memo: dict) -> "SparseAttentionOverride":
        return self

    def dense(self, func: Callable, q, k, v, heads: int, **kwargs: Any):
        """The dense path: the chained override or ComfyUI's own attention function."""
        kwargs["_inside_attn_wrapper"] = True
        if self.previous is not None:
            return self.previous(func, q, k, v, heads, **kwargs)
        return func(q, k, v, heads, **kwargs)

    def layer_index(self, options: dict, state: ForwardState | None) -> int | None:
        """Flat layer index of this self-attention call, or None (not a block call: dense)."""
        block = options.get("block_index")
        if block is not None:
            return block + self.n_double if options.get("block_type") == "single" else block
        tagged = options.get(LAYER_KEY)
        if tagged is not None:
            return tagged
        if self.family.count_calls and state is not None:
            state.calls += 1
            return state.calls - 1
        return None

    def geometry(self, options: dict, state: ForwardState | None, seq_len: int) -> VideoGeometry | None:
        """Token geometry of a self-attention call of ``seq_len`` tokens, or None (dense)."""
        grid = options.get("grid_sizes")
        if grid is None:
            if state is None:
                return None
            grid = state.grid
        frames, height, width = (int(g) for g in grid)
        extra = seq_len - frames * height * width
        if extra < 0:  # shorter than the video: a text-only call
            return None
        if self.family.extra_at == "suffix":
            text = extra if state is None or state.text is None else min(state.text, extra)
            return VideoGeometry(frames, height, width, prefix=extra - text, suffix=text)
        return VideoGeometry(frames, height, width, prefix=extra)

    # Kept out of torch.compile: layer and sigma pick precompiled plans in Python (compiled, they
    # would guard and recompile per layer and per step); the kernel is one custom op either way.
    @torch.compiler.disable
    def __call__(self, func: Callable, q, k, v, heads: int, mask=None, attn_precision=None,
                 skip_reshape: bool = False, skip_output_reshape: bool = False, **kwargs: Any):
        passthrough = dict(kwargs, mask=mask, attn_precision=attn_precision,
                           skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)
        seq_axis = 2 if skip_reshape else 1
        if mask is not None or q.shape[seq_axis] != k.shape[seq_axis]:
            return self.dense(func, q, k, v, heads, **passthrough)
        options = kwargs.get("transformer_options") or {}
        state = options.get(FORWARD_KEY)
        layer = self.layer_index(options, state)
        geometry = None if layer is None else self.geometry(options, state, q.shape[seq_axis])
        if geometry is None:
            return self.dense(func, q, k, v, heads, **passthrough)
        sigma = state.sigma if state is not None and state.sigma is not None else _first_sigma(options)
        if sigma is None:
            return self.dense(func, q, k, v, heads, **passthrough)

        batch, seq = q.shape[0], q.shape[seq_axis]
        if skip_reshape:
            layout, qs, ks, vs = "bhld", q, k, v
        else:
            layout = "blhd"
            qs, ks, vs = (t.reshape(batch, seq, heads, -1) for t in (q, k, v))

        def dense(q_, k_, v_):
            # back to the caller's form, through the chain, then to the engine's layout; q_ may
            # hold a subset of the heads (a mixed layer's dense heads)
            if layout == "bhld":
                return self.dense(func, q_, k_, v_, q_.shape[1], **dict(passthrough, skip_output_reshape=True))
            n_heads = q_.shape[2]
            flat = [t.reshape(batch, seq, -1) for t in (q_, k_, v_)]
            out = self.dense(func, *flat, n_heads, **dict(passthrough, skip_output_reshape=False))
            return out.view(batch, seq, n_heads, -1)

        try:
            out = self.controller.attention(qs, ks, vs, layer=layer, sigma=sigma, geometry=geometry,
                                            layout=layout, dense=dense)
        except ValueError as err:
            if not self._warned:
                log.warning("Sparse-vDiT: running dense attention (layer %d): %s", layer, err)
                self._warned = True
            return self.dense(func, q, k, v, heads, **passthrough)
        return _to_caller(out, layout, skip_output_reshape)


def _to_caller(out, layout: str, skip_output_reshape: bool):
    """Engine output (same layout as its q) to ComfyUI's expected form."""
    if layout == "bhld":
        if skip_output_reshape:
            return out
        b, h, seq, d = out.shape
        return out.transpose(1, 2).reshape(b, seq, h * d)
    if skip_output_reshape:
        return out.transpose(1, 2)
    b, seq, h, d = out.shape
    return out.reshape(b, seq, h * d)


class ReinstallOnPrepare:
    """CallbacksMP.ON_PREPARE_STATE callback: put our override back on top each step.

    ComfyUI calls it as (patcher, timestep) in older and (patcher, timestep, model_options) in
    newer versions; the live model_options is used when given.
    """

    def __init__(self, override: SparseAttentionOverride):
        self.override = override

    def __call__(self, patcher: Any, *args: Any) -> None:
        model_options = args[1] if len(args) >= 2 and isinstance(args[1], dict) else patcher.model_options
        options = model_options.setdefault("transformer_options", {})
        options[OVERRIDE_KEY] = self.override.on_top_of(options.get(OVERRIDE_KEY))

    def __deepcopy__(self, memo: dict) -> "ReinstallOnPrepare":
        return self
