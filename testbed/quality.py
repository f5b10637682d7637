"""Quality harness on the testbed: how far sparse-attention samples drift from dense ones.

For a strategy, the held-out prompts x seeds are sampled twice from the same noise, once dense
and once through `SparseEngine(strategy)`; PSNR and SSIM of sparse against dense, per video, are
reported as mean +- standard error. The floor is what an unrelated video scores: the dense sample
of the same prompt from the other seed. Density is counted over the whole run: dense warm-up
steps count as 1.

SSIM is our own small torch implementation (Wang et al. 2004): a 7x7 Gaussian window
(sigma 1.5) over each frame and channel, no padding, data range 2 ([-1, 1] pixels),
C1 = (0.01*2)^2, C2 = (0.03*2)^2, averaged over the video.

Uniform baselines (`--baselines`): every head of every layer gets the same pattern, at several
target densities, each with the warm-up (dense first steps) that gives the best PSNR:
all-diagonal, all-multi-diagonal, all-local-window, radial-like (Radial Attention approximated by
a static union of a Diagonal band, dense near the query, and a MultiDiagonal band over all frames,
the same place in every frame; one parameter scaled to the density), and a random per-head choice
among diagonal / multi-diagonal / local-window at the same density.

    python -m sparse_vdit.testbed.quality --baselines      # writes bench/results/testbed.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..adapters.sampling import wan_scheduler
from ..strategies.engine import SparseEngine
from ..strategies.geometry import VideoGeometry
from ..strategies.patterns import Diagonal, MultiDiagonal, Pattern, Union, pattern_for_density
from ..strategies.strategy import Strategy
from .data import HELD_OUT
from .generate import GUIDANCE, SAMPLE_STEPS, generate
from .model import FLOW_SHIFT, WEIGHTS_DIR, load_testbed, testbed_geometry

EVAL_PROMPTS = tuple(p.text for p in HELD_OUT[:8])
EVAL_SEEDS = (0, 1)
WARMUP_STEPS = (0, 1, 2, 3)  # of SAMPLE_STEPS = 8: 0, 12.5, 25, 37.5 % of the steps dense
TARGET_DENSITIES = (0.05, 0.1, 0.2)
BASELINES = ("diagonal", "multi_diagonal", "local_window", "radial", "random")
RANDOM_FAMILIES = ("diagonal", "multi_diagonal", "local_window")
RESULTS_FILE = Path(__file__).resolve().parents[1] / "bench" / "results" / "testbed.md"


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per video of `[B, ...]` tensors in [-1, 1] (data range 2); inf where equal."""
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse)


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(r**2) / (2 * sigma**2))
    w = w / w.sum()
    return (w[:, None] * w[None, :])[None, None]


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per video of `[B, C, F, H, W]` tensors in [-1, 1] (see the module docstring)."""
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim != 5 or min(x.shape[-2:]) < 7:
        raise ValueError(f"ssim needs [B, C, F, H, W] with H, W >= 7, got {tuple(x.shape)}")
    b = x.shape[0]
    a = x.double().flatten(0, 2)[:, None]  # [B*C*F, 1, H, W]
    c = y.double().flatten(0, 2)[:, None]
    window = _gaussian_window()
    blur = lambda t: torch.nn.functional.conv2d(t, window)  # noqa: E731
    mu_a, mu_c = blur(a), blur(c)
    var_a = blur(a * a) - mu_a**2
    var_c = blur(c * c) - mu_c**2
    cov = blur(a * c) - mu_a * mu_c
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    index = ((2 * mu_a * mu_c + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_c**2 + c1) * (var_a + var_c + c2))
    return index.reshape(b, -1).mean(1)


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    values = values.double().flatten()
    if values.numel() == 0:
        raise ValueError("mean_se of no values")
    se = values.std(unbiased=True) / math.sqrt(values.numel()) if values.numel() > 1 else torch.tensor(0.0)
    return float(values.mean()), float(se)


def sampling_sigmas(steps: int = SAMPLE_STEPS) -> list[float]:
    """The sigma of each sampling step (UniPC flow, shift FLOW_SHIFT), as the loop pins them."""
    scheduler = wan_scheduler(FLOW_SHIFT)
    scheduler.set_timesteps(steps)
    return [float(s) for s in scheduler.sigmas[:steps]]


def warmup_threshold(sigmas: Sequence[float], warmup: int) -> float | None:
    """`dense_above_sigma` that makes exactly the first `warmup` steps dense (None for 0)."""
    if not 0 <= warmup <= len(sigmas):
        raise ValueError(f"warmup {warmup} outside 0..{len(sigmas)} steps")
    if warmup == 0:
        return None
    if warmup == len(sigmas):
        return 0.0  # every step's sigma is > 0
    return (sigmas[warmup - 1] + sigmas[warmup]) / 2


def uniform_strategy(head_patterns: Sequence[Sequence[Pattern]], sigmas: Sequence[float], warmup: int) -> Strategy:
    """One-bucket strategy with `head_patterns[layer][head]` at every step after `warmup` dense steps."""
    patterns = tuple(tuple(layer) for layer in head_patterns)
    return Strategy(
        layers=len(patterns),
        heads=len(patterns[0]),
        sigma_edges=(math.inf, 0.0),
        patterns=(patterns,),
        dense_above_sigma=warmup_threshold(sigmas, warmup),
    )


def radial_pattern(density: float, geom: VideoGeometry) -> Pattern:
    """Radial-like union Diagonal(w) | MultiDiagonal(w / frames): w bisected to the density."""

    def make(w: float) -> Pattern:
        return Union(Diagonal(w), MultiDiagonal(min(1.0, w / geom.frames)))

    lo, hi = 0.0, float(geom.frames)
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if make(mid).density(geom) < density else (lo, mid)
    return min((make(lo), make(hi)), key=lambda p: abs(p.density(geom) - density))


def baseline_patterns(name: str, density: float, geom: VideoGeometry, layers: int, heads: int, seed: int = 0):
    """`[layer][head]` patterns of one uniform baseline at a target density."""
    if name in ("diagonal", "multi_diagonal", "local_window"):
        pattern = pattern_for_density(name, density, geom)
        return [[pattern] * heads for _ in range(layers)]
    if name == "radial":
        pattern = radial_pattern(density, geom)
        return [[pattern] * heads for _ in range(layers)]
    if name == "random":
        rng = random.Random(seed)
        by_family = {f: pattern_for_density(f, density, geom) for f in RANDOM_FAMILIES}
        return [[by_family[rng.choice(RANDOM_FAMILIES)] for _ in range(heads)] for _ in range(layers)]
    raise ValueError(f"unknown baseline {name!r}; known: {BASELINES}")


@dataclass
class Score:
    """Quality of one strategy against the dense samples."""

    density: float  # whole run, dense steps counted as 1
    sparse_density: float  # mean pattern density of the sparse steps
    psnr: tuple[float, float]  # mean, standard error
    ssim: tuple[float, float]


class Harness:
    """Dense reference samples of (prompts x seeds), and the scoring of strategies against them."""

    def __init__(self, model, prompts: Sequence[str] = EVAL_PROMPTS, seeds: Sequence[int] = EVAL_SEEDS, *,
                 steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE, force_reference: bool = True):
        if len(seeds) < 2:
            raise ValueError("the unrelated-seed floor needs at least two seeds")
        self.model, self.steps, self.guidance = model, steps, guidance
        self.force_reference = force_reference
        self.prompts = [p for p in prompts for _ in seeds]
        self.seeds = [s for _ in prompts for s in seeds]
        self.n_seeds = len(seeds)
        self.sigmas = sampling_sigmas(steps)
        cfg = model.config
        self.layers, self.heads = cfg.num_layers, cfg.num_attention_heads
        self.geometry = testbed_geometry(dict(cfg))
        self.dense = generate(model, self.prompts, self.seeds, steps=steps, guidance=guidance)

    def floor(self) -> Score:
        """Dense sample vs the dense sample of the same prompt with the next seed (unrelated video);
        one value per (prompt, consecutive seed pair)."""
        by_prompt = self.dense.view(-1, self.n_seeds, *self.dense.shape[1:])
        a, b = by_prompt[:, :-1].flatten(0, 1), by_prompt[:, 1:].flatten(0, 1)
        return Score(1.0, 1.0, mean_se(psnr(a, b)), mean_se(ssim(a, b)))

    def run_density(self, strategy: Strategy) -> tuple[float, float]:
        """(whole-run density, mean density of the sparse steps) over this harness's steps."""
        warm = strategy.dense_above_sigma
        sparse = [s for s in self.sigmas if warm is None or s <= warm]
        whole = strategy.density(self.geometry, self.sigmas)
        return whole, (strategy.density(self.geometry, sparse) if sparse else 1.0)

    def score(self, strategy: Strategy) -> Score:
        """Sample through the strategy from the same noise and compare with the dense samples."""
        if (strategy.layers, strategy.heads) != (self.layers, self.heads):
            raise ValueError(f"strategy is {strategy.layers}x{strategy.heads}, model is {self.layers}x{self.heads}")
        engine = SparseEngine(strategy, force_reference=self.force_reference)
        videos = generate(self.model, self.prompts, self.seeds, steps=self.steps, guidance=self.guidance, controller=engine)
        density, sparse_density = self.run_density(strategy)
        return Score(density, sparse_density, mean_se(psnr(videos, self.dense)), mean_se(ssim(videos, self.dense)))


@dataclass
class BaselineRow:
    name: str
    target: float
    warmup: int
    score: Score


def run_baselines(harness: Harness, names: Sequence[str] = BASELINES, densities: Sequence[float] = TARGET_DENSITIES,
                  warmups: Sequence[int] = WARMUP_STEPS, log=print) -> list[BaselineRow]:
    """Score every (baseline, target density, warm-up)."""
    rows = []
    for name in names:
        for target in densities:
            heads = baseline_patterns(name, target, harness.geometry, harness.layers, harness.heads)
            for warmup in warmups:
                started = time.perf_counter()
                score = harness.score(uniform_strategy(heads, harness.sigmas, warmup))
                rows.append(BaselineRow(name, target, warmup, score))
                log(f"{name:15s} target {target:.3f} warm-up {warmup}: density {score.density:.3f} "
                    f"PSNR {score.psnr[0]:.2f}+-{score.psnr[1]:.2f} SSIM {score.ssim[0]:.3f} ({time.perf_counter() - started:.1f}s)")
    return rows


def best_warmups(rows: Sequence[BaselineRow]) -> list[BaselineRow]:
    """For each (baseline, target), the row with the highest mean PSNR."""
    best: dict[tuple[str, float], BaselineRow] = {}
    for row in rows:
        key = (row.name, row.target)
        if key not in best or row.score.psnr[0] > best[key].score.psnr[0]:
            best[key] = row
    return list(best.values())


def warmups_for(steps: int) -> tuple[int, ...]:
    """The warm-ups (dense first steps) a run of `steps` sampling steps tries."""
    return tuple(w for w in WARMUP_STEPS if w < steps)


def _gaps(rows: Sequence[BaselineRow], steps: int) -> list[str]:
    """What a cut-off run lacks: baselines without rows, and (baseline, density) pairs missing warm-ups."""
    done = {(row.name, row.target, row.warmup) for row in rows}
    missing = [name for name in BASELINES if name not in {row.name for row in rows}]
    gaps = [f"no rows for {', '.join(missing)}"] if missing else []
    expected = warmups_for(steps)
    for name in (n for n in BASELINES if n not in missing):
        for target in TARGET_DENSITIES:
            tried = [w for w in expected if (name, target, w) in done]
            if len(tried) < len(expected):
                gaps.append(f"{name} at {target:g} has warm-ups {', '.join(map(str, tried)) or 'none'} "
                            f"of {', '.join(map(str, expected))}")
    return gaps


def _fmt(pair: tuple[float, float], digits: int) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def baselines_markdown(harness: Harness, rows: Sequence[BaselineRow], floor: Score, *, command: str, device: str,
                       seconds: float) -> str:
    """The results page: settings, the floor, best warm-up per (baseline, density), every run."""
    steps = harness.steps
    gaps = _gaps(rows, steps)
    lines = [
        "# Testbed: quality of uniform sparse baselines",
        "",
        f"Written by `{command}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"device {device}, {seconds:.0f} s. Model: the shipped testbed (testbed/weights, docs/testbed.md).",
        "",
        f"Sampling: {len(harness.prompts) // harness.n_seeds} held-out prompts x {harness.n_seeds} seeds, "
        f"{steps} UniPC-flow steps (shift {FLOW_SHIFT}), CFG {harness.guidance}. Each sparse video starts from the "
        "same noise as its dense reference; PSNR / SSIM of sparse vs dense per video, mean ± standard error. "
        "Density = attended (q, k) pairs over all, averaged over every step of the run with dense warm-up steps "
        "counted as 1. Warm-up = number of first steps run dense. Reference engine backend (exact masks).",
        "",
        f"**Floor** (dense sample vs the dense sample of the same prompt from another seed): "
        f"PSNR {_fmt(floor.psnr, 2)} dB, SSIM {_fmt(floor.ssim, 3)}.",
        "",
        *([f"**Incomplete run**: {'; '.join(gaps)}.", ""] if gaps else []),
        "## Best warm-up per baseline and target density",
        "",
        "| baseline | target density | best warm-up (steps) | sparse-step density | run density | PSNR dB | SSIM |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sorted(best_warmups(rows), key=lambda r: (r.name, r.target)):
        s = row.score
        lines.append(f"| {row.name} | {row.target:.3f} | {row.warmup} of {steps} | {s.sparse_density:.3f} | "
                     f"{s.density:.3f} | {_fmt(s.psnr, 2)} | {_fmt(s.ssim, 3)} |")
    lines += ["", "## Every run", "", "| baseline | target | warm-up | run density | PSNR dB | SSIM |", "|---|---|---|---|---|---|"]
    for row in rows:
        s = row.score
        lines.append(f"| {row.name} | {row.target:.3f} | {row.warmup} | {s.density:.3f} | {_fmt(s.psnr, 2)} | {_fmt(s.ssim, 3)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Quality of sparse attention on the testbed.")
    parser.add_argument("--baselines", action="store_true", required=True, help="score the uniform baselines")
    parser.add_argument("--out", type=Path, default=RESULTS_FILE)
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=len(EVAL_PROMPTS), help="first N held-out prompts")
    parser.add_argument("--steps", type=int, default=SAMPLE_STEPS)
    parser.add_argument("--only", default=",".join(BASELINES), metavar="NAMES",
                        help=f"comma-separated baselines to score (default all: {','.join(BASELINES)})")
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= len(HELD_OUT):
        parser.error(f"--prompts must be in 1..{len(HELD_OUT)}")
    names = tuple(n.strip() for n in args.only.split(",") if n.strip())
    unknown = [n for n in names if n not in BASELINES]
    if unknown or not names:
        parser.error(f"--only: unknown baseline(s) {unknown or args.only!r}; known: {', '.join(BASELINES)}")
    started = time.perf_counter()
    model = load_testbed(args.weights, args.device)
    harness = Harness(model, [p.text for p in HELD_OUT[: args.prompts]], steps=args.steps)
    floor = harness.floor()
    print(f"floor: PSNR {_fmt(floor.psnr, 2)} SSIM {_fmt(floor.ssim, 3)}")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    command = "python -m sparse_vdit.testbed.quality --baselines" + "".join(
        f" --{name} {value}" for name, value, default in (
            ("prompts", args.prompts, len(EVAL_PROMPTS)), ("steps", args.steps, SAMPLE_STEPS),
            ("only", ",".join(names), ",".join(BASELINES)))
        if value != default)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[BaselineRow] = []
    for name in names:
        for target in TARGET_DENSITIES:
            for warmup in warmups_for(args.steps):  # the page is rewritten after each run: a cut-off run keeps its rows
                rows += run_baselines(harness, names=(name,), densities=(target,), warmups=(warmup,))
                args.out.write_text(baselines_markdown(harness, rows, floor, command=command, device=device,
                                                       seconds=time.perf_counter() - started))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
