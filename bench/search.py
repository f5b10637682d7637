"""Search time vs the same dense sampling run, at a real shape (Wan2.1-1.3B 480p, random bf16 weights).

    python3 -m sparse_vdit.bench.search [--steps 4] [--target-speedup 2] [--rows 64] [--out FILE] [--tiny]
                                        [--latent B,C,T,H,W]

Runs: one short dense warm-up run (kernel/cuDNN set-up), the timed dense run, the one-off cost
table measurement (per GPU and geometry, cached on disk afterwards, reported apart), then the
search (dense pass + closed pass) on the same seed and schedule. Reports both times, their ratio
(issue target: <= 2.5x), the peak GPU memory of each, and what the found strategy predicts.
``--tiny`` runs the tiny Wan config on the CPU (reference kernels) as a functional check;
``--latent`` changes the latent shape (e.g. ``--tiny --latent 1,4,9,32,48`` for a mid-size CPU run).
Where the search's time goes: the error estimate per measured call and the chosen patterns' layer
per closed-pass call (CUDA-event times on a GPU, wall time on the CPU), next to the two passes.
Prints a markdown table last (and writes it to --out when given).
"""

from __future__ import annotations

import argparse
import time

import torch

from ..adapters.loading import build_empty, materialise, shipped_config
from ..adapters.wan import wan_geometry
from ..cli import wan_runner
from ..strategies.cost import CostModel
from ..strategies.search import SearchSettings, candidate_set, search
from .report import emit

REAL = ("Wan2.1-1.3B 480p 81f", "wan-t2v-1.3b", (1, 16, 21, 60, 104), 512)
TINY = ("Wan tiny (CPU)", "wan-tiny", (1, 4, 3, 8, 12), 7)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return time.perf_counter() - start, peak, out


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--target-speedup", type=float, default=2.0)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--latent", default=None, help="latent shape B,C,T,H,W (default: the model's 480p / tiny one)")
    args = ap.parse_args(argv)

    label, variant, latent, text_len = TINY if args.tiny else REAL
    if args.latent:
        latent = tuple(int(x) for x in args.latent.split(","))
        label = f"{label}, latent {args.latent}"
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    torch.manual_seed(0)
    model = materialise(build_empty(shipped_config(variant)), None, dtype=dtype, device=device)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    prompt, negative = (torch.randn(1, text_len, cfg.text_dim, generator=gen) for _ in range(2))
    geometry = wan_geometry(latent, tuple(cfg.patch_size))
    print(f"{label}: L = {geometry.seq_len} ({geometry.describe()}), {cfg.num_layers} layers x "
          f"{cfg.num_attention_heads} heads, {args.steps} steps with CFG", flush=True)

    warm_run, _ = wan_runner(model, latent, prompt, negative, steps=1, guidance=5.0, shift=3.0, seed=0)
    warm_run(None)
    run, sigmas = wan_runner(model, latent, prompt, negative, steps=args.steps, guidance=5.0, shift=3.0, seed=0)
    t_dense, mem_dense, _ = _timed(lambda: run(None), device)
    print(f"dense run {t_dense:.2f}s", flush=True)

    settings = SearchSettings(target_speedup=args.target_speedup, rows=args.rows)
    cost = CostModel(geometry, cfg.num_attention_heads, cfg.attention_head_dim, dtype, device)
    candidates = candidate_set(geometry, settings.densities, settings.families)
    t_cost, _, _ = _timed(lambda: (cost.costs(candidates), cost.dense_layer()), device)
    print(f"cost table ({len(candidates)} candidates, {cost.unit}) {t_cost:.2f}s", flush=True)

    t_search, mem_search, result = _timed(
        lambda: search(run, sigmas=sigmas, layers=cfg.num_layers, settings=settings,
                       cost_model_factory=lambda *a: cost), device)
    sel = result.selection
    calls = result.call_seconds

    def per_call(key):
        seconds, n = calls.get(key, (0.0, 0))
        return f"{1e3 * seconds / n:.2f} ({n} calls, {seconds:.2f} s)" if n else "-"
    density = result.strategy.density(geometry, sigmas)
    rows = [
        ("model", label), ("device", torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        ("steps (CFG: 2 forwards each)", args.steps), ("query rows sampled per call", args.rows),
        ("candidates", len(candidates)),
        ("dense run (s)", f"{t_dense:.2f}"), ("search, both passes (s)", f"{t_search:.2f}"),
        ("search / dense", f"{t_search / t_dense:.2f}x (target <= 2.5x)"),
        ("dense pass / closed pass (s)", " / ".join(f"{result.pass_seconds.get(k, float('nan')):.2f}"
                                                     for k in ("dense", "closed"))),
        ("search - 2 x dense run (s)", f"{t_search - 2 * t_dense:.2f}"),
        ("error estimate per call, dense pass (ms)", per_call("dense measure")),
        ("error estimate per call, closed pass (ms)", per_call("closed measure")),
        ("chosen patterns' layer per call, closed pass (ms)", per_call("closed sparse")),
        ("cost table measurement, one-off (s)", f"{t_cost:.2f}"),
        ("peak GPU memory dense / search (GiB)", f"{mem_dense:.2f} / {mem_search:.2f}"),
        ("predicted attention speedup", f"{sel.predicted_speedup:.2f}x ({cost.unit})"),
        ("token density over the run", f"{density:.3f}"),
        ("warm-up buckets / dense layers", f"{sel.warmup_buckets} / {sorted(sel.dense_layers)}"),
    ]
    table = "| quantity | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
    return emit(table, args.out)


if __name__ == "__main__":
    main()
