"""One attention layer for a hardware-counter profile: plans each named layer, runs it once (the
autotuner tunes outside the profile), then once more inside an NVTX range "profile", so

    ncu --clock-control none --nvtx --nvtx-include "profile/" --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section WarpStateStats \
        python3 -m sparse_vdit.bench.profile_layer --shape cogvideox --layers dense,diagonal:0.1

reports exactly one launch of our kernel per layer (and any copy kernels the layer launches).
Layers: "dense" or "FAMILY:DENSITY" (FAMILY from strategies.patterns.FAMILIES).
"""

from __future__ import annotations

import argparse

import torch

from ..kernels import preferred_tiles
from ..strategies.patterns import FAMILIES, Dense, pattern_for_density
from ..strategies.plan import compile_layer
from .attention import SHAPES


def layer_patterns(spec: str, geometry, heads: int) -> tuple:
    """The per-head patterns of one layer spec ("dense" or "FAMILY:DENSITY")."""
    if spec == "dense":
        return (Dense(),) * heads
    family, _, density = spec.partition(":")
    if family not in FAMILIES or not density:
        raise ValueError(f"layer {spec!r}: expected 'dense' or FAMILY:DENSITY with FAMILY in {', '.join(FAMILIES)}")
    return (pattern_for_density(family, float(density), geometry),) * heads


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="cogvideox", choices=sorted(SHAPES))
    parser.add_argument("--layers", default="dense,diagonal:0.1,vertical_stripe:0.1,multi_diagonal:0.1")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/profile_layer.py needs a CUDA GPU")
    _, geometry, heads, head_dim = SHAPES[args.shape]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, geometry.seq_len, head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    for spec in args.layers.split(","):
        plan = compile_layer(layer_patterns(spec, geometry, heads), geometry, *preferred_tiles(head_dim), "cuda")
        plan.run(q, k, v)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("profile")
        plan.run(q, k, v)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        print(f"profiled {args.shape} {spec}", flush=True)


if __name__ == "__main__":
    main()
