"""Rotary position embedding (RoPE) of q or k in one pass, bit-identical to diffusers' float32 math.

diffusers rotates interleaved channel pairs (2i, 2i + 1) of `[B, L, H, D]` in float32 through
several full-size temporaries (one Wan2.1-14B 720p tensor: 6.08 ms on an H200, against 0.42 ms here;
BENCHMARKS.md section 2). `rotate_pairs` reads x once and writes the result once, with
the same float32 products, differences and sums in the same order and no fused multiply-add, so the
result is bit-identical: an all-dense strategy still reproduces the stock model exactly.

Two ways to read the (cos, sin) tables `[L, D]`, float32, values repeated per pair:
- "wan" (`WanAttnProcessor`): both outputs of pair i read cos[2i] and sin[2i + 1];
- "per_channel" (`diffusers.models.embeddings.apply_rotary_emb`, HunyuanVideo and CogVideoX):
  output channel c reads cos[c] and sin[c].
"""

from __future__ import annotations

import importlib.util

import torch

SELECTS = ("wan", "per_channel")


def rotate_pairs_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, select: str) -> torch.Tensor:
    """The torch math of `rotate_pairs` (x `[B, L, H, D]`, tables `[L, D]`): products in the promoted
    dtype (float32 for float32 tables), rounded to x's dtype; diffusers' Wan processor computes so."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    if select == "wan":
        c_even = c_odd = cos[..., 0::2]
        s_even = s_odd = sin[..., 1::2]
    else:
        c_even, c_odd, s_even, s_odd = cos[..., 0::2], cos[..., 1::2], sin[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * c_even - odd * s_even  # type promotion: float32 products for float32 tables
    out[..., 1::2] = even * s_odd + odd * c_odd
    return out


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, select: str, out) -> None:
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x must be [B, L, H, D] with an even D, got shape {tuple(x.shape)}")
    expected = (x.shape[1], x.shape[3])
    if tuple(cos.shape) != expected or tuple(sin.shape) != expected:
        raise ValueError(f"cos and sin must be [L, D] = {list(expected)} for x of shape {tuple(x.shape)}, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.device != x.device or sin.device != x.device:
        raise ValueError(f"cos ({cos.device}) and sin ({sin.device}) must be on x's device {x.device}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"out must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), "
                         f"got {tuple(out.shape)}, {out.dtype}, {out.device}")


def _kernel_fits(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out) -> bool:
    """Whether the Triton kernel computes the same function: float32 tables (else the products would
    be in another precision), a power-of-two D, unit channel strides."""
    d = x.shape[-1]
    return (cos.dtype == sin.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and d >= 2 and d & (d - 1) == 0 and x.stride(-1) == 1 and (out is None or out.stride(-1) == 1)
            and cos.stride(-1) == sin.stride(-1) == 1)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, select: str = "per_channel",
                 out: torch.Tensor | None = None, use_kernel: bool | None = None) -> torch.Tensor:
    """RoPE of x `[B, L, H, D]` (any strides; `out` may be x itself) with float32 tables `[L, D]`, read
    as `select` says; returns `out` (a new tensor when None). The Triton kernel runs on CUDA tensors
    with Triton installed (`use_kernel` None), or when asked (True: under TRITON_INTERPRET on the CPU); other cases, and
    tables of another dtype, take the torch math, which gives the same bits."""
    _check(x, cos, sin, select, out)
    if use_kernel is None:
        use_kernel = x.is_cuda and importlib.util.find_spec("triton") is not None
    if use_kernel and _kernel_fits(x, cos, sin, out):
        from .triton_rotary import launch_rotate_pairs

        result = torch.empty_like(x) if out is None else out
        launch_rotate_pairs(x, cos, sin, result, select == "wan")
        return result
    rotated = rotate_pairs_reference(x, cos, sin, select)
    if out is None:
        return rotated
    out.copy_(rotated)
    return out
