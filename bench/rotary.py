"""RoPE of q or k at the real shapes: diffusers' float32 torch math against the one-pass Triton kernel
(kernels/rotary.py), same bits; milliseconds per tensor and the kernel's GB/s (x read once, written once).
The torch math is diffusers' own `apply_rotary_emb` for HunyuanVideo and CogVideoX, and for Wan
`rotary.rotate_pairs_reference` (the same operations as the function inside `WanAttnProcessor`).

    python3 -m sparse_vdit.bench.rotary [--out FILE]
"""

from __future__ import annotations

import argparse

import torch

from ..kernels.rotary import rotate_pairs, rotate_pairs_reference
from .report import emit

SHAPES = {  # (B, L, H, D) of the rotated rows, the tables' selection
    "Wan2.1-14B 720p": ((1, 75600, 40, 128), "wan"),
    "Wan2.1-1.3B 480p": ((1, 32760, 12, 128), "wan"),
    "HunyuanVideo 720p": ((1, 118800, 24, 128), "per_channel"),
    "CogVideoX1.5 768p (CFG batch 2)": ((2, 44880, 48, 64), "per_channel"),
}


def main(argv=None) -> str:
    import triton
    from diffusers.models.embeddings import apply_rotary_emb

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    lines = ["| shape | torch math (ms) | one-pass kernel (ms) | speedup | kernel GB/s | same bits |", "|---|---|---|---|---|---|"]
    for label, (shape, select) in SHAPES.items():
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        angle = torch.rand(shape[1], shape[3] // 2, device="cuda") * 50
        cos, sin = angle.cos().repeat_interleave(2, 1), angle.sin().repeat_interleave(2, 1)
        same = torch.equal(rotate_pairs(x, cos, sin, select), rotate_pairs_reference(x, cos, sin, select))
        stock = (lambda: rotate_pairs_reference(x, cos, sin, select)) if select == "wan" else \
            (lambda: apply_rotary_emb(x, (cos, sin), sequence_dim=1))
        same = same and torch.equal(stock(), rotate_pairs(x, cos, sin, select))
        t_ref = triton.testing.do_bench(stock, return_mode="median")
        t_ker = triton.testing.do_bench(lambda: rotate_pairs(x, cos, sin, select), return_mode="median")
        gbs = 2 * x.numel() * x.element_size() / t_ker / 1e6
        lines.append(f"| {label} {tuple(shape)} | {t_ref:.3f} | {t_ker:.3f} | {t_ref / t_ker:.1f}x | {gbs:.0f} | {same} |")
        del x
    return emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
