"""Quality of searched strategies on the trained testbed vs the best uniform baseline at equal density.

    python3 -m sparse_vdit.bench.search_quality [--targets 2,3,4,6] [--prompts 8] [--steps 8]
        [--families radial,diagonal] [--out FILE] [--weights DIR] [--device cuda]

One search on calibration prompts from the TRAINING split (never the evaluation prompts) at the
first target speedup, then re-selection (no new search) at the other targets. Each strategy is
scored with the testbed harness (held-out prompts x 2 seeds, PSNR/SSIM vs dense, density over
the whole run, dense warm-up counted). For each, the uniform baselines of ``--families`` (names of
``testbed.quality.BASELINES``) at the same whole-run density are scored with every warm-up of 0..3
steps and the best is kept.
Also reported: the search's predicted (weighted) error of each strategy, to show it ranks the
final-sample error. Runs on a GPU when present, else the CPU (fp32, reference kernels either way:
the testbed is small); prints a markdown table last.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from ..strategies.search import SearchSettings, search
from ..strategies.select import reselect
from ..testbed.data import TRAIN_PROMPTS
from ..testbed.generate import generate
from ..testbed.model import WEIGHTS_DIR, load_testbed
from ..testbed.quality import EVAL_PROMPTS, EVAL_SEEDS, Harness, baseline_patterns, uniform_strategy
from .report import emit

CALIBRATION = (TRAIN_PROMPTS[0].text, TRAIN_PROMPTS[len(TRAIN_PROMPTS) // 2].text)
CALIBRATION_SEEDS = (100, 101)


def _spearman(a, b) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"


def best_uniform(harness: Harness, density: float, families, log) -> tuple[str, int, object]:
    """The best-PSNR uniform baseline whose whole-run density equals ``density``."""
    T = len(harness.sigmas)
    best = None
    for family in families:
        for warm in range(min(4, T)):
            sparse = (density * T - warm) / (T - warm)
            if sparse <= 0:
                continue
            heads = baseline_patterns(family, min(sparse, 1.0), harness.geometry, harness.layers, harness.heads)
            score = harness.score(uniform_strategy(heads, harness.sigmas, warm))
            log(f"  baseline {family} warm-up {warm}: density {score.density:.3f} PSNR {score.psnr[0]:.2f}")
            if best is None or score.psnr[0] > best[2].psnr[0]:
                best = (family, warm, score)
    return best


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="2,3,4,6", help="attention speedups (cost model) to select at")
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts (x 2 seeds)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--families", default="radial,diagonal",
                    help="uniform families to compare at equal density ('' = none: compare with the table of "
                         "bench/results/testbed.md, same harness)")
    ap.add_argument("--weights", default=str(WEIGHTS_DIR))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    targets = [float(t) for t in args.targets.split(",")]
    families = [f for f in args.families.split(",") if f]
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    torch.manual_seed(0)
    model = load_testbed(args.weights, device=args.device)
    started = time.perf_counter()
    harness = Harness(model, EVAL_PROMPTS[:args.prompts], EVAL_SEEDS, steps=args.steps)
    floor = harness.floor()
    log(f"dense references {time.perf_counter() - started:.0f}s; floor PSNR {floor.psnr[0]:.2f}")

    def run(controller):
        return generate(model, CALIBRATION, CALIBRATION_SEEDS, steps=args.steps, controller=controller)

    settings = SearchSettings(target_speedup=targets[0], rows=args.rows)
    started = time.perf_counter()
    with torch.no_grad():
        result = search(run, sigmas=harness.sigmas, layers=harness.layers, settings=settings)
    log(f"search {time.perf_counter() - started:.0f}s")
    rows = []
    for target in targets:
        strategy = result.strategy if target == targets[0] else reselect(result.strategy, target_speedup=target)
        score = harness.score(strategy)
        predicted = strategy.meta["search"]["predicted_error"]
        log(f"searched target {target}: density {score.density:.3f} PSNR {score.psnr[0]:.2f} "
            f"SSIM {score.ssim[0]:.3f} predicted error {predicted:.4g} warm-up above sigma "
            f"{strategy.dense_above_sigma} dense layers {sorted(strategy.dense_layers)}")
        best = best_uniform(harness, score.density, families, log) if families else None
        rows.append((target, strategy, score, predicted, best))

    spearman = _spearman([r[3] for r in rows], [-r[2].psnr[0] for r in rows])
    lines = [
        f"Testbed, {args.prompts} held-out prompts x {len(EVAL_SEEDS)} seeds, {args.steps} steps; calibration "
        f"prompts {list(CALIBRATION)} seeds {list(CALIBRATION_SEEDS)}; floor (unrelated seed) PSNR "
        f"{floor.psnr[0]:.2f} dB. {datetime.date.today()}, {_device_name(args.device)}, "
        f"`python3 -m sparse_vdit.bench.search_quality --targets {args.targets} --prompts {args.prompts}`.",
        "",
        "| target speedup | density | searched PSNR (dB) | SSIM | predicted error | warm-up / dense layers "
        "| best uniform at equal density | its PSNR (dB) | gain (dB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for target, strategy, score, predicted, best in rows:
        warm_desc = f"sigma > {strategy.dense_above_sigma:.3f}" if strategy.dense_above_sigma is not None else "none"
        if best is None:
            base_cells = "not run (--families '') | | "
        else:
            family, warm, base = best
            base_cells = (f"{family}, {warm} dense steps (density {base.density:.3f}) | "
                          f"{base.psnr[0]:.2f} ± {base.psnr[1]:.2f} | {score.psnr[0] - base.psnr[0]:+.2f}")
        lines.append(
            f"| {target:g} | {score.density:.3f} | {score.psnr[0]:.2f} ± {score.psnr[1]:.2f} | {score.ssim[0]:.3f} "
            f"| {predicted:.4g} | {warm_desc} / {sorted(strategy.dense_layers)} | {base_cells} |")
    lines += ["", f"Spearman rank correlation of predicted error with PSNR loss: {spearman:.2f}"]
    table = "\n".join(lines) + "\n"
    return emit(table, args.out)


if __name__ == "__main__":
    main()
