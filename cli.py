"""The ``sparse-vdit`` command line: run, search, info, select.

``sparse-vdit run`` is the first thing to try: on the shipped testbed model (CPU, a few minutes,
8 steps) it searches a strategy, samples dense and sparse with the same seed and writes frames,
a PNG strip, the strategy file and a report into ``--out`` (default ./out). With ``--checkpoint``,
``--vae`` and ``--embeddings`` it runs a real Wan2.x model instead (meant for a GPU).
Bad strategy files exit with code 2 and the StrategyError message.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .strategies.file import StrategyError, load_strategy, model_fingerprint, save_strategy, strategy_summary
from .strategies.geometry import VideoGeometry

EXIT_BAD_FILE = 2


class ProgressBar:
    """``callback(done, total)`` drawing a one-line bar on stderr."""

    def __init__(self, label: str, stream=None, width: int = 30):
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        frac = done / total if total else 1.0
        filled = int(round(frac * self.width))
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} "
                          f"{elapsed:6.1f}s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def wan_runner(model, noise_shape, prompt, negative, *, steps: int, guidance: float, shift: float, seed: int):
    """``(run, sigmas)`` for a Wan model: ``run(controller, progress=None)`` samples one video from
    the seeded noise with ``controller`` at the attention sites (``None`` = stock attention) and
    returns its latents, calling ``progress(done, total)`` after each step; ``sigmas`` are the
    sigmas of its steps (what a search buckets on)."""
    from .adapters.sampling import initial_noise, sample_wan, wan_scheduler

    scheduler = wan_scheduler(shift)
    scheduler.set_timesteps(steps)
    sigmas = [float(s) for s in scheduler.sigmas[:steps]]
    device = next(model.parameters()).device
    noise = initial_noise(noise_shape, seed, device=device)
    prompt, negative = prompt.to(device, model.dtype), negative.to(device, model.dtype)

    def run(controller, progress: Callable | None = None):
        step_cb = None if progress is None else (lambda i, n, s: progress(i + 1, n))
        with torch.no_grad():
            return sample_wan(model, noise, prompt, negative_embeds=negative, steps=steps, guidance=guidance,
                              shift=shift, controller=controller, callback=step_cb)

    return run, sigmas


@dataclass
class Job:
    """A model ready to sample: its runner, schedule, architecture and how to see its output."""

    model: Any
    run: Callable
    sigmas: list
    geometry: VideoGeometry
    layers: int
    heads: int
    head_dim: int
    family: str
    variant: str
    decode: Callable  # latents -> videos [B, 3, F, H, W] in [-1, 1]
    schedule: dict

    @property
    def fingerprint(self) -> dict:
        return model_fingerprint(self.model, layers=self.layers, heads=self.heads, head_dim=self.head_dim,
                                 family=self.family, variant=self.variant)


def _device(args) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _testbed_job(args) -> Job:
    from .testbed import data
    from .testbed.generate import GUIDANCE
    from .testbed.model import FLOW_SHIFT, build_model, load_testbed, model_config

    device = _device(args)
    frames, size = data.FRAMES, data.SIZE
    if args.tiny:  # a small random-weight model of the testbed's architecture: a smoke test
        config = {**model_config(), "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 32,
                  "ffn_dim": 64, "freq_dim": 32}
        frames, size = 3, 16
        torch.manual_seed(0)
        model = build_model(config).to(device).eval()
    else:
        try:
            model = load_testbed(device=device)
        except FileNotFoundError as exc:
            raise SystemExit(f"sparse-vdit: {exc}; the testbed weights ship with the package "
                             "(use --tiny for a random-weight smoke test)") from None
    prompt = data.prompt_embeddings([args.prompt])
    negative = torch.zeros_like(prompt)
    guidance = GUIDANCE if args.guidance is None else args.guidance
    shift = FLOW_SHIFT if args.shift is None else args.shift
    run, sigmas = wan_runner(model, (1, 3, frames, size, size), prompt, negative, steps=args.steps,
                             guidance=guidance, shift=shift, seed=args.seed)
    cfg = model.config
    pt, ph, pw = cfg.patch_size
    geometry = VideoGeometry(frames // pt, size // ph, size // pw)
    return Job(model, run, sigmas, geometry, cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim,
               "wan", "testbed-tiny" if args.tiny else "testbed", lambda x: x.float().clamp(-1, 1).cpu(),
               {"steps": args.steps, "guidance": guidance, "shift": shift, "seed": args.seed, "prompt": args.prompt})


def _checkpoint_job(args) -> Job:
    from safetensors.torch import load_file

    from .adapters.loading import decode_video, load_transformer, load_vae
    from .adapters.wan import wan_geometry

    if not (args.vae and args.embeddings):
        raise SystemExit("sparse-vdit: --checkpoint needs --vae and --embeddings too")
    device = _device(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = load_transformer(args.checkpoint, dtype=dtype, device=device)
    if loaded.family != "wan":
        raise SystemExit(f"sparse-vdit: the CLI runs Wan2.x checkpoints; {args.checkpoint} is {loaded.family}")
    vae = load_vae(args.vae, device=device)
    embeds = load_file(args.embeddings)
    if "prompt_embeds" not in embeds:
        raise SystemExit(f"sparse-vdit: {args.embeddings} needs a 'prompt_embeds' tensor [1, N, 4096] "
                         "(and optionally 'negative_embeds')")
    prompt = embeds["prompt_embeds"]
    negative = embeds.get("negative_embeds", torch.zeros_like(prompt))
    model = loaded.model
    cfg = model.config
    shape = (1, cfg.in_channels, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    guidance = 5.0 if args.guidance is None else args.guidance
    shift = 3.0 if args.shift is None else args.shift
    run, sigmas = wan_runner(model, shape, prompt, negative, steps=args.steps, guidance=guidance, shift=shift,
                             seed=args.seed)
    geometry = wan_geometry(shape, tuple(cfg.patch_size))
    return Job(model, run, sigmas, geometry, cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim,
               loaded.family, loaded.variant, lambda x: decode_video(vae, x, "wan").float().cpu(),
               {"steps": args.steps, "guidance": guidance, "shift": shift, "seed": args.seed})


def _job(args) -> Job:
    return _checkpoint_job(args) if args.checkpoint else _testbed_job(args)


def _search(args, job: Job):
    from .strategies.cost import CostModel
    from .strategies.search import SearchSettings, search

    settings = SearchSettings(target_speedup=args.target_speedup if args.error_budget is None else None,
                              error_budget=args.error_budget, rows=args.rows)
    device = next(job.model.parameters()).device
    cost = CostModel(job.geometry, job.heads, job.head_dim, job.model.dtype, device)
    started = time.perf_counter()
    result = search(job.run, sigmas=job.sigmas, layers=job.layers, settings=settings,
                    progress=ProgressBar("search"), state_path=args.state,
                    meta={"cost_unit": cost.unit},
                    cost_model_factory=lambda *a: cost)
    return result, cost, time.perf_counter() - started


def _save(job: Job, result, path: Path, cost) -> None:
    save_strategy(result.strategy, path, fingerprint=job.fingerprint, geometry=job.geometry,
                  schedule={**job.schedule, "sigmas": job.sigmas}, gpu=cost.gpu)


def _to_frames(videos: torch.Tensor) -> torch.Tensor:
    """[1, 3, F, H, W] in [-1, 1] -> IMAGE frames [F, H, W, 3] in [0, 1]."""
    return ((videos[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) / 2).contiguous()


def _write_gif(path: Path, frames: torch.Tensor, scale: int) -> None:
    from PIL import Image

    pixels = (frames * 255).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2).numpy()
    images = [Image.fromarray(p) for p in pixels]
    images[0].save(path, save_all=True, append_images=images[1:], duration=150, loop=0)


def cmd_run(args) -> int:
    from .nodes.compare_frames import psnr_per_frame, ssim_per_frame
    from .strategies.engine import SparseEngine
    from .testbed.strips import save_strip

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    job = _job(args)
    timings = {}
    started = time.perf_counter()
    dense_latents = job.run(None, progress=ProgressBar("dense "))
    timings["dense_run_s"] = time.perf_counter() - started
    result, cost, timings["search_s"] = _search(args, job)
    strategy_path = out / "strategy.safetensors"
    _save(job, result, strategy_path, cost)
    strategy = load_strategy(strategy_path)
    device = next(job.model.parameters()).device
    engine = SparseEngine(strategy, force_reference=device.type != "cuda")
    started = time.perf_counter()
    sparse_latents = job.run(engine, progress=ProgressBar("sparse"))
    timings["sparse_run_s"] = time.perf_counter() - started

    dense_v, sparse_v = job.decode(dense_latents), job.decode(sparse_latents)
    dense_f, sparse_f = _to_frames(dense_v), _to_frames(sparse_v)
    psnr, ssim = psnr_per_frame(dense_f, sparse_f), ssim_per_frame(dense_f, sparse_f)
    finite = [p for p in psnr if math.isfinite(p)]
    scale = max(1, 128 // dense_f.shape[1])
    _write_gif(out / "dense.gif", dense_f, scale)
    _write_gif(out / "sparse.gif", sparse_f, scale)
    save_strip(out / "strip.png", torch.cat([dense_v, sparse_v]), ["dense", "sparse"], scale=max(1, scale // 2))
    prediction = cost.predict(strategy, job.sigmas)
    search_meta = strategy.meta["search"]
    report = {
        "model": f"{job.family}/{job.variant}", "geometry": job.geometry.describe(), "schedule": job.schedule,
        "density": float(strategy.density(job.geometry, job.sigmas)),
        "psnr_db": sum(finite) / len(finite) if finite else math.inf,
        "ssim": sum(ssim) / len(ssim),
        "dense_above_sigma": strategy.dense_above_sigma, "dense_layers": sorted(strategy.dense_layers),
        **{k: round(v, 3) for k, v in timings.items()},
        "predicted_attention_speedup": prediction["attention_speedup"],
        "cost_unit": prediction["unit"],
        "predicted_error": search_meta.get("predicted_error"),
        "target_speedup": search_meta.get("target_speedup"),
        "note": ("on this CPU the sparse run uses the pure-torch reference path, which is not faster than "
                 "dense; the predicted speedup is the cost model's (FLOP-proportional off-GPU, measured "
                 "kernel times on a GPU)") if device.type != "cuda" else "",
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    lines = [f"# sparse-vdit run: {report['model']} at {report['geometry']}", ""]
    lines += [f"- {k}: {v}" for k, v in report.items() if k not in ("model", "geometry")]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out}/: dense.gif sparse.gif strip.png strategy.safetensors report.json report.md")
    return 0


def cmd_search(args) -> int:
    job = _job(args)
    result, cost, seconds = _search(args, job)
    _save(job, result, Path(args.output), cost)
    sel = result.selection
    print(f"searched in {seconds:.1f}s: predicted attention speedup {sel.predicted_speedup:.2f}x "
          f"({cost.unit}), predicted error {sel.predicted_error:.4g}, warm-up buckets {sel.warmup_buckets}, "
          f"dense layers {sorted(sel.dense_layers)}; wrote {args.output}")
    return 0


def _info_geometry(strategy, args) -> VideoGeometry:
    from .strategies.file import searched_geometry

    if args.frames and args.height and args.width:
        return VideoGeometry(args.frames, args.height, args.width)
    geom = searched_geometry(strategy)
    if geom is None:
        raise SystemExit("sparse-vdit: the file records no geometry; give --frames --height --width (patches)")
    return geom


def _schedule_sigmas(strategy) -> list:
    sigmas = ((strategy.meta or {}).get("schedule") or {}).get("sigmas")
    if sigmas:
        return [float(s) for s in sigmas]
    edges = strategy.sigma_edges
    return [min(edges[b], 1.0) * 0.5 + edges[b + 1] * 0.5 for b in range(len(edges) - 1)]


def cmd_info(args) -> int:
    from .strategies.cost import CostModel

    strategy = load_strategy(args.file)
    geom = _info_geometry(strategy, args)
    sigmas = _schedule_sigmas(strategy)
    summary = strategy_summary(strategy, geom, sigmas)
    head_dim = int(((strategy.meta or {}).get("model") or {}).get("head_dim", 128))
    device = _device(args)
    cost = CostModel(geom, strategy.heads, head_dim, device=device)
    prediction = cost.predict(strategy, sigmas)
    model = (strategy.meta or {}).get("model") or {}
    print(f"{args.file}: {strategy.layers} layers x {strategy.heads} heads, {summary['buckets']} sigma buckets, "
          f"model {model.get('family', '?')}/{model.get('variant', '?')}")
    print(f"geometry {geom.describe()}; dense above sigma {strategy.dense_above_sigma}; "
          f"dense layers {summary['dense_layers'] or 'none'}")
    for row in summary["layers"]:
        modes = ", ".join(f"{k} {v}" for k, v in sorted(row["modes"].items()))
        print(f"  layer {row['layer']:3d}: density {row['density']:.3f}  ({modes})")
    print(f"density over the schedule: {summary['density']:.3f}")
    print(f"predicted attention speedup here ({cost.gpu}, {prediction['unit']}): "
          f"{prediction['attention_speedup']:.2f}x")
    return 0


def cmd_select(args) -> int:
    from .strategies.cost import CostModel
    from .strategies.select import reselect

    strategy = load_strategy(args.file)
    cost = None
    if args.this_gpu:
        geom = _info_geometry(strategy, args)
        head_dim = int(((strategy.meta or {}).get("model") or {}).get("head_dim", 128))
        cost = CostModel(geom, strategy.heads, head_dim, device=_device(args))
    started = time.perf_counter()
    new = reselect(strategy, target_speedup=args.target_speedup, error_budget=args.error_budget, cost=cost)
    seconds = time.perf_counter() - started
    save_strategy(new, args.output)
    s = new.meta["search"]
    print(f"re-selected in {seconds:.2f}s: predicted attention speedup {s['predicted_speedup']:.2f}x, "
          f"predicted error {s['predicted_error']:.4g}; wrote {args.output}")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=8, help="sampling steps (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="large red square moving left", help="testbed prompt")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (testbed 3, Wan 5)")
    p.add_argument("--shift", type=float, default=None, help="flow shift (testbed 3, Wan 480p 3)")
    p.add_argument("--target-speedup", type=float, default=2.0, help="attention speedup to reach (default 2)")
    p.add_argument("--error-budget", type=float, default=None, help="instead of a speedup: total weighted error")
    p.add_argument("--rows", type=int, default=64, help="query rows sampled per call to estimate errors")
    p.add_argument("--state", default=None, help="file keeping a resumable partial search")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--tiny", action="store_true", help="a small random-weight testbed (smoke test)")
    p.add_argument("--checkpoint", default=None, help="Wan2.x transformer (.safetensors or diffusers folder)")
    p.add_argument("--vae", default=None, help="Wan VAE file or folder (with --checkpoint)")
    p.add_argument("--embeddings", default=None,
                   help="safetensors with prompt_embeds [1, N, 4096] (+ negative_embeds) for --checkpoint")
    p.add_argument("--frames", type=int, default=81, help="video frames (with --checkpoint)")
    p.add_argument("--height", type=int, default=480, help="pixels (with --checkpoint)")
    p.add_argument("--width", type=int, default=832, help="pixels (with --checkpoint)")


def _geometry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=0, help="grid frames (patches; default: as searched)")
    p.add_argument("--height", type=int, default=0, help="grid rows (patches)")
    p.add_argument("--width", type=int, default=0, help="grid columns (patches)")
    p.add_argument("--device", default=None, help="device whose costs to predict with")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="sparse-vdit", description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="search + dense and sparse samples + report (testbed on CPU by default)")
    _model_args(p)
    p.add_argument("--out", default="out", help="output folder (default ./out)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("search", help="search a strategy and write it")
    _model_args(p)
    p.add_argument("-o", "--output", default="strategy.safetensors")
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("info", help="modes per layer, density, predicted speedup here")
    p.add_argument("file")
    _geometry_args(p)
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("select", help="re-select a searched strategy for a new budget (no search)")
    p.add_argument("file")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-speedup", type=float)
    budget.add_argument("--error-budget", type=float)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--this-gpu", action="store_true", help="re-measure the pattern costs on this machine")
    _geometry_args(p)
    p.set_defaults(func=cmd_select)
    return top


def main(argv=None) -> int:
    """Entry point of the ``sparse-vdit`` console script."""
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except StrategyError as exc:
        print(f"sparse-vdit: {exc}", file=sys.stderr)
        return EXIT_BAD_FILE


if __name__ == "__main__":
    sys.exit(main())
