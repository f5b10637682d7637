"""The Triton kernel of `rotary.rotate_pairs`: a program rotates BLOCK_T tokens of one sample, all
heads, loading that block's cos and sin once. Compiled without fused multiply-add, so every product,
difference and sum is rounded as torch rounds it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreter_fix  # noqa: F401  (loop bounds under TRITON_INTERPRET)

BLOCK_T = 16


@triton.jit
def _rotate_pairs_kernel(X, OUT, COS, SIN, L, H, stride_xb, stride_xl, stride_xh, stride_ob, stride_ol, stride_oh,
                         stride_cl, stride_sl, D: tl.constexpr, BLOCK_T: tl.constexpr, WAN: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.program_id(1).to(tl.int64)
    ch = tl.arange(0, D)
    inside = (tok < L)[:, None]
    tok64 = tok.to(tl.int64)[:, None]
    c_even, c_odd = tl.split(tl.reshape(tl.load(COS + tok64 * stride_cl + ch[None, :], mask=inside, other=0.0),
                                        [BLOCK_T, D // 2, 2]))
    s_even, s_odd = tl.split(tl.reshape(tl.load(SIN + tok64 * stride_sl + ch[None, :], mask=inside, other=0.0),
                                        [BLOCK_T, D // 2, 2]))
    if WAN:  # both outputs of a pair read cos[2i] and sin[2i + 1]
        c_odd = c_even
        s_even = s_odd
    x_rows = X + b * stride_xb + tok64 * stride_xl + ch[None, :]
    o_rows = OUT + b * stride_ob + tok64 * stride_ol + ch[None, :]
    for h in range(H):
        x = tl.load(x_rows + h * stride_xh, mask=inside, other=0.0)
        even, odd = tl.split(tl.reshape(x.to(tl.float32), [BLOCK_T, D // 2, 2]))
        out_even = even * c_even - odd * s_even
        out_odd = even * s_odd + odd * c_odd
        out = tl.reshape(tl.join(out_even, out_odd), [BLOCK_T, D])
        tl.store(o_rows + h * stride_oh, out.to(OUT.dtype.element_ty), mask=inside)


# launched as it is under torch.compile: dynamo would trace the launch (under TRITON_INTERPRET it fails
# to), and its wrapper of user Triton kernels need not keep enable_fp_fusion=False
@torch.compiler.disable
def launch_rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, wan: bool) -> None:
    """Rotate x `[B, L, H, D]` into out (shapes checked by `rotary.rotate_pairs`)."""
    B, L, H, D = x.shape
    if B == 0 or L == 0 or H == 0:
        return
    grid = (triton.cdiv(L, BLOCK_T), B)
    _rotate_pairs_kernel[grid](x, out, cos, sin, L, H, x.stride(0), x.stride(1), x.stride(2), out.stride(0),
                               out.stride(1), out.stride(2), cos.stride(0), sin.stride(0), D=D, BLOCK_T=BLOCK_T,
                               WAN=wan, enable_fp_fusion=False)
