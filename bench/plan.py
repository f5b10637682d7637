"""Plan-compiler cost: how long compiling a layer's tables takes and how much memory every plan of
a model holds (issue #2: one 40-head layer at ~120k tokens <= 50 ms; all plans of a 60-layer
720p model <= 256 MB). Runs anywhere (the tables are built on the host); --device cuda also
moves them to the GPU as a real run does.

    python3 -m sparse_vdit.bench.plan [--shape hunyuan] [--heads 40] [--layers 60] [--device cpu]
        [--threads N] [--per-pattern]

Rows, each from a cleared plan cache (single layers: the median of five compiles; the process's
one-time cube-order map of the geometry is built before the first row):
- one layer of `heads` distinct random patterns (every head classified: the worst case), three draws;
- one layer drawn from the search's candidate set (what a searched strategy holds);
- every layer of a `layers`-layer model from that candidate set, one sigma bucket per draw, 3 buckets;
- every layer of a `layers`-layer model with every head of every layer distinct (the memory worst case).
"""

from __future__ import annotations

import argparse
import random
import time

from ..strategies.patterns import FAMILIES, pattern_for_density
from ..strategies import plan as plan_module
from ..strategies.plan import clear_plans, compile_layer, pool_bytes
from ..strategies.search import candidate_set
from .attention import SHAPES


def _timed(layers, geometry, tiles, device) -> tuple[float, int]:
    """(seconds, pool bytes) to compile `layers` (tuples of patterns) from a cleared cache."""
    clear_plans()
    start = time.perf_counter()
    for patterns in layers:
        compile_layer(patterns, geometry, *tiles, device)
    return time.perf_counter() - start, pool_bytes()


def plan_rows(geometry, heads: int, layers: int, tiles=(128, 64), device="cpu", seed: int = 0,
              buckets: int = 3) -> list[dict]:
    """The module docstring's rows: name, layers compiled, distinct patterns, ms, MB."""
    rng = random.Random(seed)

    def random_layer():
        return tuple(pattern_for_density(rng.choice(FAMILIES), rng.uniform(0.05, 0.5), geometry)
                     for _ in range(heads))

    candidates = candidate_set(geometry, (0.05, 0.1, 0.2, 0.35))
    searched = [tuple(rng.choice(candidates) for _ in range(heads)) for _ in range(layers * buckets)]
    cases = [(f"one layer, {heads} distinct random heads (draw {i + 1})", [random_layer()]) for i in range(3)]
    cases += [(f"one layer of {heads} heads from the {len(candidates)} search candidates", searched[:1]),
              (f"{layers} layers x {buckets} buckets from the search candidates", searched),
              (f"{layers} layers, every head distinct", [random_layer() for _ in range(layers)])]
    _timed(cases[0][1], geometry, tiles, device)  # once per process: the cube-order map of the geometry
    rows = []
    for name, compiled in cases:
        times = [_timed(compiled, geometry, tiles, device) for _ in range(5 if len(compiled) == 1 else 1)]
        seconds, nbytes = sorted(times)[len(times) // 2]
        rows.append(dict(case=name, layers=len(compiled), distinct=len({p for layer in compiled for p in layer}),
                         ms=seconds * 1e3, mb=nbytes / 2 ** 20))
    clear_plans()
    return rows


def pattern_rows(geometry, tiles=(128, 64), device="cpu") -> list[dict]:
    """Each search candidate compiled alone from a cleared cache (median of five): name, ms."""
    rows = []
    for pattern in candidate_set(geometry, (0.05, 0.1, 0.2, 0.35)):
        times = sorted(_timed([(pattern,)], geometry, tiles, device)[0] for _ in range(5))
        rows.append(dict(pattern=str(pattern), ms=times[2] * 1e3))
    clear_plans()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="hunyuan", choices=sorted(SHAPES))
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="threads classifying a layer's new rules")
    parser.add_argument("--per-pattern", action="store_true", help="also time each search candidate alone")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        plan_module._CLASSIFY_THREADS = args.threads
    label, geometry, _, _ = SHAPES[args.shape]
    print(f"{label}, L = {geometry.seq_len}, tiles 128x64, tables on {args.device}, "
          f"{plan_module._CLASSIFY_THREADS} classifying threads\n")
    print("| case | layers | distinct patterns | ms | table MB |\n|---|---|---|---|---|")
    for r in plan_rows(geometry, args.heads, args.layers, device=args.device):
        print(f"| {r['case']} | {r['layers']} | {r['distinct']} | {r['ms']:.0f} | {r['mb']:.1f} |")
    if args.per_pattern:
        print("\n| pattern (alone) | ms |\n|---|---|")
        for r in pattern_rows(geometry, device=args.device):
            print(f"| {r['pattern']} | {r['ms']:.1f} |")


if __name__ == "__main__":
    main()
