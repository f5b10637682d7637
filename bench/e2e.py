"""End-to-end transformer forward times at real sizes with random bf16 weights (no download).

For each model: the unpatched forward; the forward through our processors with an all-dense
strategy (and its max |diff| to unpatched, which should be 0; our processors also rotate q and k in
one pass, kernels/rotary.py, so this forward may be faster than unpatched); the forward through our
processors with attention replaced by a zero-cost stand-in (t_none: the attention share s of our
dense forward is 1 - t_none / t_dense); hand-made paper-like strategies (heads cycling diagonal /
multi-diagonal / vertical-stripe) at token density 0.25 and 0.45 with the measured speedup over
unpatched next to Amdahl's t_stock / (t_none + density (t_dense - t_none)), i.e. sparse attention at
our dense rate per attended pair (1 / ((1 - s) + s density) when t_dense = t_stock), and the speedup
over our own dense forward (sparse attention alone); and the time per video of a 50-step run whose
first 20% of steps are dense.

    python3 -m sparse_vdit.bench.e2e [--models wan14b,hunyuan,cogvideox,wan13b] [--repeats 1]
        [--out FILE] [--tiny]

`--tiny` runs the tiny configs on the CPU (fp32, reference kernel) as a functional check.
Prints a markdown table last (and writes it to --out when given).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..adapters import cogvideox, hunyuan, wan
from ..adapters.loading import build_empty, materialise, shipped_config
from ..strategies.engine import SparseEngine
from ..strategies.patterns import pattern_for_density
from ..strategies.strategy import Strategy
from .report import emit

PAPER_FAMILIES = ("diagonal", "multi_diagonal", "vertical_stripe")
DENSITIES = (0.25, 0.45)
STEPS, DENSE_FRACTION = 50, 0.2


@dataclass(frozen=True)
class Case:
    """One benchmarked model: config, label, latent shape, forwards per sampling step."""

    label: str
    variant: str
    tiny_variant: str
    latent: tuple[int, ...]
    tiny_latent: tuple[int, ...]
    text: int  # text tokens (CogVideoX: its config's max_text_seq_length is used)
    tiny_text: int
    forwards_per_step: int  # Wan: CFG as two batch-1 forwards; CogVideoX: one batch-2 forward


CASES = {
    "wan14b": Case("Wan2.1-14B 720p 81f", "wan-t2v-14b", "wan-tiny", (1, 16, 21, 90, 160), (1, 4, 3, 8, 12), 512, 7, 2),
    "hunyuan": Case("HunyuanVideo 720p 129f", "hunyuanvideo-t2v", "hunyuanvideo-tiny", (1, 16, 33, 90, 160),
                    (1, 4, 3, 8, 12), 256, 8, 1),
    "cogvideox": Case("CogVideoX1.5 768p 81f (CFG batch 2)", "cogvideox1.5-5b-t2v", "cogvideox1.5-tiny",
                      (2, 22, 16, 96, 170), (2, 4, 4, 8, 12), 226, 8, 1),
    "wan13b": Case("Wan2.1-1.3B 480p 81f", "wan-t2v-1.3b", "wan-tiny", (1, 16, 21, 60, 104), (1, 4, 3, 8, 12), 512, 7, 2),
}


class NoAttention:
    """A controller whose attention costs nothing (returns q): the forward minus attention."""

    def attention(self, q, k, v, **kw):
        return q


def family_parts(model, latent, text, dtype, device, generator):
    """(install, geometry, forward inputs) of a model for one latent shape, with `text` random
    text tokens (all valid)."""
    config = model.config
    randn = lambda *shape: torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)  # noqa: E731
    batch = latent[0]
    name = type(model).__name__
    if name == "WanTransformer3DModel":
        inputs = dict(hidden_states=randn(*latent), timestep=torch.full((batch,), 900.0, device=device),
                      encoder_hidden_states=randn(batch, text, config.text_dim))
        return wan.install, wan.wan_geometry(latent, config.patch_size), inputs
    if name == "HunyuanVideoTransformer3DModel":
        inputs = dict(hidden_states=randn(*latent), timestep=torch.full((batch,), 900.0, device=device),
                      encoder_hidden_states=randn(batch, text, config.text_embed_dim),
                      encoder_attention_mask=torch.ones(batch, text, device=device, dtype=dtype),
                      pooled_projections=randn(batch, config.pooled_projection_dim),
                      guidance=torch.full((batch,), 6000.0, device=device, dtype=dtype))
        return hunyuan.install, hunyuan.hunyuan_geometry(latent, config.patch_size, config.patch_size_t, text), inputs
    text = config.max_text_seq_length
    rope = tuple(r.to(device) for r in cogvideox.cogvideox_rope(config, latent))
    inputs = dict(hidden_states=randn(*latent), timestep=torch.full((batch,), 900, device=device, dtype=torch.long),
                  encoder_hidden_states=randn(batch, text, config.text_embed_dim), image_rotary_emb=rope)
    return cogvideox.install, cogvideox.cogvideox_geometry(latent, config.patch_size, config.patch_size_t, text), inputs


def prefer_cudnn():
    """SDPA (the dense path everywhere) tries cuDNN first, then flash, efficient, math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def paper_like(layers: int, heads: int, density: float, geometry) -> Strategy:
    """Every layer: heads cycling the three Sparse-vDiT patterns, each at `density`."""
    cycle = [pattern_for_density(family, density, geometry) for family in PAPER_FAMILIES]
    layer = tuple(cycle[h % len(cycle)] for h in range(heads))
    return Strategy(layers, heads, (math.inf, 0.0), ((layer,) * layers,))


def timed(fn: Callable[[], torch.Tensor], repeats: int, device) -> tuple[float, torch.Tensor]:
    """(median seconds over `repeats` after one warm-up call, last output)."""
    def once():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    out = once()[1]
    times = []
    for _ in range(repeats):
        seconds, out = once()
        times.append(seconds)
    return statistics.median(times), out


def bench_case(case: Case, *, tiny: bool, repeats: int, device, dtype) -> Iterator[dict]:
    """All rows of one model, yielded as each is measured."""
    variant, latent, text = (case.tiny_variant, case.tiny_latent, case.tiny_text) if tiny \
        else (case.variant, case.latent, case.text)
    config = shipped_config(variant)
    torch.manual_seed(0)
    model = materialise(build_empty(config), None, dtype=dtype, device=device)
    install, geometry, inputs = family_parts(model, latent, text, dtype, device,
                                              torch.Generator().manual_seed(0))
    sites = {"WanTransformer3DModel": wan.wan_sites, "HunyuanVideoTransformer3DModel": hunyuan.hunyuan_sites,
             "CogVideoXTransformer3DModel": cogvideox.cogvideox_sites}[type(model).__name__](model)
    layers, heads = len(sites), sites[0][1].heads

    @torch.no_grad()
    def forward():
        return model(**inputs, return_dict=False)[0]

    def through(controller):
        with install(model, controller):
            return timed(forward, repeats, device)

    print(f"{case.label}: L = {geometry.seq_len} ({geometry.describe()}), {layers} layers x {heads} heads", flush=True)
    t_stock, out_stock = timed(forward, repeats, device)
    engine_kw = dict(force_reference=True) if tiny else {}
    t_dense, out_dense = through(SparseEngine(Strategy.dense(layers, heads), **engine_kw))
    t_none, _ = through(NoAttention())
    attention = max(0.0, t_dense - t_none)
    share = attention / t_dense
    diff = (out_dense.float() - out_stock.float()).abs().max().item()
    video_dense = STEPS * case.forwards_per_step * t_stock
    yield dict(model=case.label, strategy="unpatched (SDPA)", density=1.0, seconds=t_stock, speedup=1.0,
               amdahl=1.0, share=share, video=video_dense, video_speedup=1.0, note=f"no-attention forward {t_none:.3f} s")
    yield dict(model=case.label, strategy="all-dense strategy (engine)", density=1.0, seconds=t_dense,
               speedup=t_stock / t_dense, amdahl=t_stock / t_dense, share=share, video=video_dense * t_dense / t_stock,
               video_speedup=t_stock / t_dense, note=f"max |diff| to unpatched {diff:.3g}")
    dense_steps = round(STEPS * DENSE_FRACTION)
    for density in DENSITIES:
        strategy = paper_like(layers, heads, density, geometry)
        real = strategy.density(geometry, [0.9])
        t_sparse, _ = through(SparseEngine(strategy, **engine_kw))
        amdahl = t_stock / (t_none + real * attention)
        video = case.forwards_per_step * (dense_steps * t_dense + (STEPS - dense_steps) * t_sparse)
        yield dict(model=case.label, strategy=f"paper-like {density:.2f}", density=real, seconds=t_sparse,
                   speedup=t_stock / t_sparse, amdahl=amdahl, share=share, video=video,
                   video_speedup=video_dense / video,
                   note=f"heads cycle diagonal / multi-diagonal / stripe; {t_dense / t_sparse:.2f}x our dense forward")


def markdown(rows: list[dict], header: str) -> str:
    """The result rows as a markdown table."""
    lines = [header, "",
             "| model | strategy | token density | s / forward | speedup | Amdahl | realised / Amdahl | "
             "attention share | s / video (50 steps, 20% dense) | video speedup | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines.extend(markdown_row(r) for r in rows)
    return "\n".join(lines)


def markdown_row(r: dict) -> str:
    """One result row as a markdown table line."""
    return (f"| {r['model']} | {r['strategy']} | {r['density']:.3f} | {r['seconds']:.3f} | "
            f"{r['speedup']:.2f}x | {r['amdahl']:.2f}x | {r['speedup'] / r['amdahl']:.2f} | "
            f"{r['share']:.1%} | {r['video']:.1f} | {r['video_speedup']:.2f}x | {r['note']} |")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards per row, after one warm-up")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (functional check)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(CASES)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        parser.error("no CUDA GPU: run with --tiny for the CPU functional check")
    rows = []
    with prefer_cudnn():
        for name in names:
            for row in bench_case(CASES[name], tiny=args.tiny, repeats=args.repeats, device=device, dtype=dtype):
                rows.append(row)
                print(markdown_row(row), flush=True)  # a run cut short keeps the rows it measured
            gc.collect()  # the model of that case is unreferenced now: free it before the next one
            if device.type == "cuda":
                torch.cuda.empty_cache()
    where = "CPU, tiny configs, fp32, reference kernel" if args.tiny else \
        f"{torch.cuda.get_device_name()}, bf16, SDPA preferring cuDNN"
    table = markdown(rows, f"End-to-end forward, {where}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    return emit(table, args.out)


if __name__ == "__main__":
    main()
