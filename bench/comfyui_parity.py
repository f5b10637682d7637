"""Apply Strategy on ComfyUI's native Wan model vs the diffusers adapter, at the same strategy.

Issue #6: "Apply Strategy on a native Wan model is as fast as the models issue's adapter at the
same strategy (within 5%), also under TorchCompileModel". One set of random weights (bf16, on the
GPU) feeds both models: the diffusers ``WanTransformer3DModel`` (our adapter, ``adapters/wan.py``)
and, converted to the original Wan key names, ComfyUI's loader
(``comfy.sd.load_diffusion_model_state_dict``, what UNETLoader calls after reading the file), which
detects the model and returns a ModelPatcher around ``comfy.ldm.wan.model.WanModel``.

Native forwards run through ComfyUI's own sampling path: a ``CFGGuider`` (cfg 1, so one
conditional forward per call) with a ``KSAMPLER`` whose sampler function only calls the model
repeatedly and times each call. So every forward passes through ``calc_cond_batch`` with the
transformer_options ComfyUI builds (sigmas, sample_sigmas, wrappers, ON_PREPARE_STATE callbacks,
our per-block tags), under ``torch.inference_mode`` as ComfyUI executes nodes. The patch is the
Apply Strategy node's code (``nodes.patch.apply_strategy``) on a clone of the ModelPatcher.

Rows, each eager and then compiled: native unpatched, native + Apply(all-dense strategy), native +
Apply(sparse), adapter stock (diffusers, no processors), adapter all-dense, adapter sparse. The
sparse strategy is bench/e2e.py's hand-made one (heads cycling diagonal / multi-diagonal / stripe,
token density ~0.25). "Compiled" mimics the TorchCompileModel node: ``torch.compile`` of the whole
diffusion model (backend inductor, no mode/options/dynamic), swapped into the BaseModel by an
APPLY_MODEL wrapper for each forward, the node placed after Apply; the adapter's diffusers model
is compiled whole the same way. Dynamo's caches are reset before each compiled row (one workflow,
one model), so its first call (compile included) is reported apart.

    python3 -m sparse_vdit.bench.comfyui_parity [--model wan13b|wan14b] [--repeats 5] [--warmup 2]
        [--sections eager,compiled] [--budget SECONDS] [--out FILE] [--tiny]

Needs ComfyUI importable (``COMFYUI_ROOT``, or on ``PYTHONPATH``) and diffusers. ``--tiny`` runs
a tiny Wan (2 heads x 128, 3 layers) on the CPU in fp32 with the reference kernel as a functional
check. ``--budget`` skips rows not started within that many seconds (the table still prints).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..adapters import wan
from ..adapters.loading import build_empty, materialise, shipped_config, to_diffusers_keys
from ..strategies.engine import SparseEngine
from ..strategies.strategy import Strategy
from .e2e import paper_like, prefer_cudnn
from .report import emit

SIGMA = 0.9          # flow-matching sigma of the timed forwards (ComfyUI timestep 900)
DENSITY = 0.25
COMPILE_KEY = "sparse_vdit_bench.torch_compile"

# A tiny Wan that ComfyUI's detector accepts (it assumes head_dim 128, freq_dim 256, text_dim 4096).
TINY_CONFIG = dict(_class_name="WanTransformer3DModel", patch_size=[1, 2, 2], num_attention_heads=2,
                   attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                   ffn_dim=512, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                   image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)


@dataclass(frozen=True)
class Case:
    label: str
    config: dict | str
    latent: tuple[int, ...]
    text: int


CASES = {
    "wan13b": Case("Wan2.1-1.3B 480p 81f", "wan-t2v-1.3b", (1, 16, 21, 60, 104), 512),
    "wan14b": Case("Wan2.1-14B 720p 81f", "wan-t2v-14b", (1, 16, 21, 90, 160), 512),
}
TINY = Case("tiny Wan", TINY_CONFIG, (1, 16, 3, 8, 12), 7)


# ----------------------------------------------------------------------------- ComfyUI


def import_comfy(cpu: bool):
    """ComfyUI's modules, from COMFYUI_ROOT (put first on sys.path) or wherever they import from."""
    root = os.environ.get("COMFYUI_ROOT")
    if root and os.path.isdir(root) and root not in sys.path:
        sys.path.insert(0, root)
    try:
        from comfy.cli_args import args
    except ImportError as error:
        raise SystemExit(f"ComfyUI is not importable ({error}); set COMFYUI_ROOT to a ComfyUI tree") from error
    if cpu:
        args.cpu = True  # what `main.py --cpu` sets, before model_management reads it
    import comfy.model_management  # noqa: F401
    import comfy.samplers  # noqa: F401
    import comfy.sd  # noqa: F401

    return comfy


def original_state(diffusers_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The diffusers model's parameters under the original Wan key names (a Wan .safetensors file's
    layout), sharing storage. The names come from our loader's own original -> diffusers map, run on
    index markers, so the two models hold exactly the same weights."""
    import comfy.ldm.wan.model as wan_model
    import comfy.ops

    reference = dict(diffusers_model.named_parameters())
    config = diffusers_model.config
    dim = config.num_attention_heads * config.attention_head_dim
    with torch.device("meta"):
        native = wan_model.WanModel(model_type="t2v", patch_size=tuple(config.patch_size), text_len=512,
                                    in_dim=config.in_channels, dim=dim, ffn_dim=config.ffn_dim,
                                    freq_dim=config.freq_dim, text_dim=config.text_dim,
                                    out_dim=config.out_channels, num_heads=config.num_attention_heads,
                                    num_layers=config.num_layers, qk_norm=True, cross_attn_norm=True,
                                    eps=config.eps, device="meta", operations=comfy.ops.disable_weight_init)
    names = [k for k, _ in native.named_parameters()]
    markers = to_diffusers_keys("wan", {k: torch.tensor([float(i)]) for i, k in enumerate(names)})
    if set(markers) != set(reference):
        raise RuntimeError(f"key maps disagree: {sorted(set(markers) ^ set(reference))[:6]}")
    return {names[int(v.item())]: reference[k].detach() for k, v in markers.items()}


def load_native(state: dict[str, torch.Tensor], dtype: torch.dtype):
    """UNETLoader's path minus reading the file: detection, dtype choice (forced to `dtype`, as
    ``--bf16-unet`` would), model build, weight load, ModelPatcher."""
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model_state_dict(dict(state), model_options={"dtype": dtype})
    if patcher is None:
        raise RuntimeError("ComfyUI did not detect a model in the converted state dict")
    return patcher


def compile_like_node(patcher, backend: str):
    """A clone of ``patcher`` compiled the way ComfyUI's TorchCompileModel node does (whole
    diffusion model, default compile arguments, swapped in around each apply_model call)."""
    from comfy.patcher_extension import WrappersMP

    model = patcher.clone()
    compiled = torch.compile(model.get_model_object("diffusion_model"), backend=backend, mode=None,
                             options=None, fullgraph=False, dynamic=None)

    def swap_in(executor, *args, **kwargs):
        base = executor.class_obj
        original = base.diffusion_model
        base.diffusion_model = compiled
        try:
            return executor(*args, **kwargs)
        finally:
            base.diffusion_model = original

    model.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, COMPILE_KEY)
    model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, COMPILE_KEY, swap_in)
    return model


def sample_forwards(patcher, noise: torch.Tensor, context: torch.Tensor, calls: int,
                    clock: Callable) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Run ``calls`` model calls through ComfyUI's sampler machinery at sigma SIGMA: (seconds per
    call, the model input x, the last model output eps = (x - denoised) / sigma)."""
    import comfy.samplers

    seconds: list[float] = []
    seen: dict[str, torch.Tensor] = {}

    def timing_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        s = sigmas[0] * x.new_ones([x.shape[0]])
        denoised = None
        for _ in range(calls):
            elapsed, denoised = clock(lambda: model(x, s, **(extra_args or {})))
            seconds.append(elapsed)
        seen["x"], seen["eps"] = x.detach().clone(), ((x - denoised) / sigmas[0]).detach().float()
        return x

    guider = comfy.samplers.CFGGuider(patcher)
    positive = [[context, {}]]
    guider.set_conds(positive, positive)
    guider.set_cfg(1.0)
    sigmas = torch.tensor([SIGMA, 0.0])
    guider.sample(noise, torch.zeros_like(noise), comfy.samplers.KSAMPLER(timing_sampler), sigmas,
                  disable_pbar=True, seed=0)
    return seconds, seen["x"], seen["eps"]


# ----------------------------------------------------------------------------- timing


def make_clock(device: torch.device) -> Callable[[Callable[[], Any]], tuple[float, Any]]:
    """clock(fn) -> (seconds, fn()): CUDA events on a GPU, perf_counter elsewhere."""
    def clock(fn):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0, out
        begin = time.perf_counter()
        out = fn()
        return time.perf_counter() - begin, out
    return clock


class LimitLog(logging.Handler):
    """Counts dynamo's "hit config.recompile_limit" (cache_size_limit) warnings: past the limit a
    frame runs eagerly, which a compiled timing must show."""

    hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "recompile_limit" in message or "cache_size_limit" in message:
            LimitLog.hits += 1


def dynamo_counts() -> str:
    """Graphs, graph breaks and recompile-limit hits dynamo counted since its last reset."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"].get("unique_graphs", 0)
    breaks = sum(counters["graph_break"].values())
    text = f"{graphs} graphs, {breaks} graph breaks"
    return text + (f", {LimitLog.hits} recompile-limit hits (frames run eagerly)" if LimitLog.hits else "")


def reset_dynamo() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    LimitLog.hits = 0


@dataclass
class Row:
    mode: str
    path: str
    strategy: str
    density: float
    times: list[float] = field(default_factory=list)
    first: float | None = None
    note: str = ""
    skipped: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


# ----------------------------------------------------------------------------- the bench


def run(case: Case, *, tiny: bool, repeats: int, warmup: int, sections: list[str], backend: str,
        budget: float | None, density: float, device: torch.device, dtype: torch.dtype,
        on_row: Callable[[list[Row]], None] = lambda rows: None) -> list[Row]:
    started = time.perf_counter()
    logging.getLogger("torch._dynamo").addHandler(LimitLog())
    clock = make_clock(device)
    import_comfy(cpu=device.type != "cuda")
    from ..nodes.patch import apply_strategy

    config = case.config if isinstance(case.config, dict) else shipped_config(case.config)
    torch.manual_seed(0)
    diffusers_model = materialise(build_empty(config), None, dtype=dtype, device=device)
    native = load_native(original_state(diffusers_model), dtype)
    layers, heads = config["num_layers"], config["num_attention_heads"]
    geometry = wan.wan_geometry(case.latent, config["patch_size"])
    sparse = paper_like(layers, heads, density, geometry)
    real_density = sparse.density(geometry, [SIGMA])
    strategies = {"unpatched": None, "all-dense": Strategy.dense(layers, heads), f"sparse {density:.2f}": sparse}
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(*case.latent, generator=generator)
    context = torch.randn(case.latent[0], case.text, config["text_dim"], generator=generator).to(dtype)
    engine_kw = dict(force_reference=True) if tiny else {}
    print(f"{case.label}: L = {geometry.seq_len} ({geometry.describe()}), {layers} layers x {heads} heads, "
          f"sparse strategy token density {real_density:.3f}, native dtype {native.model_dtype()}", flush=True)

    rows: list[Row] = []
    outputs: dict[tuple[str, str, str], torch.Tensor] = {}

    def over_budget() -> bool:
        return budget is not None and time.perf_counter() - started > budget

    def record(row: Row, seconds: list[float]) -> None:
        row.first, row.times = seconds[0], seconds[warmup:]
        rows.append(row)
        print(markdown_row(row, rows), flush=True)
        on_row(rows)

    def start_row(mode: str, path: str, name: str, strategy: Strategy | None) -> Row | None:
        """The row to measure, or None when the time budget is spent (the row is kept as skipped)."""
        row = Row(mode, path, name, 1.0 if strategy is None or name == "all-dense" else real_density)
        if over_budget():
            row.skipped = "time budget (--budget)"
            rows.append(row)
            return None
        return row

    def native_row(mode: str, name: str, strategy: Strategy | None) -> None:
        row = start_row(mode, "native + Apply" if strategy is not None else "native", name, strategy)
        if row is None:
            return
        patcher = native if strategy is None else apply_strategy(native, strategy, force_reference=tiny)
        if mode == "compiled":
            reset_dynamo()
            patcher = compile_like_node(patcher, backend)
        seconds, _x, eps = sample_forwards(patcher, noise, context, warmup + repeats, clock)
        outputs[(mode, "native", name)] = eps
        row.note = check_note(outputs, mode, "native", name)
        if mode == "compiled":
            row.note += ("; " if row.note else "") + dynamo_counts()
        record(row, seconds)

    def adapter_row(mode: str, name: str, strategy: Strategy | None) -> None:
        row = start_row(mode, "adapter" if strategy is not None else "diffusers stock", name, strategy)
        if row is None:
            return
        inputs = adapter_call
        handle = None if strategy is None else wan.install(diffusers_model, SparseEngine(strategy, **engine_kw))
        try:
            model = diffusers_model
            if mode == "compiled":
                reset_dynamo()
                model = torch.compile(diffusers_model, backend=backend, mode=None, options=None,
                                      fullgraph=False, dynamic=None)
            seconds, out = [], None
            for _ in range(warmup + repeats):
                elapsed, out = clock(lambda: model(**inputs)[0])
                seconds.append(elapsed)
        finally:
            if handle is not None:
                handle.remove()
        outputs[(mode, "adapter", name)] = out.float()
        row.note = check_note(outputs, mode, "adapter", name)
        if mode == "compiled":
            row.note += ("; " if row.note else "") + dynamo_counts()
        record(row, seconds)

    with torch.inference_mode(), prefer_cudnn():
        # one untimed call of each path first: lazy set-up (CUDA context, cuDNN plans, ComfyUI's
        # model load to the GPU) lands in no row
        x = sample_forwards(native, noise, context, 1, clock)[1]  # the model input ComfyUI makes
        adapter_call = dict(hidden_states=x.to(device=device, dtype=dtype),
                            timestep=torch.full((case.latent[0],), SIGMA * 1000.0, device=device),
                            encoder_hidden_states=context.to(device), return_dict=False)
        clock(lambda: diffusers_model(**adapter_call))
        for mode in sections:
            # the pair the acceptance item compares first, so a run cut short keeps it
            order = [f"sparse {density:.2f}", "all-dense", "unpatched"] if mode == "compiled" else list(strategies)
            for name in order:
                for path, measure in (("native", native_row), ("adapter", adapter_row)):
                    try:
                        measure(mode, name, strategies[name])
                    except Exception as error:  # one failing row (a compile error, say) keeps the others
                        traceback.print_exc()
                        rows.append(Row(mode, path, name, float("nan"),
                                        skipped=f"{type(error).__name__}: {str(error)[:160]}"))
            gc.collect()
    torch._dynamo.reset()
    return rows


def check_note(outputs: dict, mode: str, path: str, name: str) -> str:
    """Max |diff| of this output to its path's unpatched one (eager), and native vs adapter."""
    out = outputs[(mode, path, name)]
    notes = []
    base = outputs.get(("eager", path, "unpatched"))
    if base is not None and not (mode == "eager" and name == "unpatched"):
        notes.append(f"max abs diff to eager unpatched {(out - base.to(out.device)).abs().max().item():.3g}")
    if path == "adapter":
        other = outputs.get((mode, "native", name))
        if other is not None:
            rel = (other.to(out.device) - out).abs().max().item() / max(out.abs().max().item(), 1e-30)
            notes.append(f"native vs adapter rel. max abs diff {rel:.3g}")
    return ", ".join(notes)


# ----------------------------------------------------------------------------- report


def partner(rows: list[Row], row: Row) -> Row | None:
    """The other path's row at the same mode and strategy."""
    want_native = not row.path.startswith("native")
    for other in rows:
        if other.mode == row.mode and other.strategy == row.strategy and other.path.startswith("native") == want_native \
                and other.times:
            return other
    return None


def unpatched_of(rows: list[Row], row: Row) -> Row | None:
    for other in rows:
        if other.mode == row.mode and other.strategy == "unpatched" and \
                other.path.startswith("native") == row.path.startswith("native") and other.times:
            return other
    return None


def markdown_row(row: Row, rows: list[Row]) -> str:
    if row.skipped:
        return f"| {row.mode} | {row.path} | {row.strategy} | {row.density:.3f} | not measured: {row.skipped} | | | | | |"
    base = unpatched_of(rows, row)
    speedup = f"{base.median / row.median:.2f}x" if base is not None else ""
    other = partner(rows, row)
    ratio = ""
    if other is not None:
        native, adapter = (row, other) if row.path.startswith("native") else (other, row)
        ratio = f"{native.median / adapter.median:.3f}"
    return (f"| {row.mode} | {row.path} | {row.strategy} | {row.density:.3f} | {row.median * 1e3:.1f} | "
            f"{min(row.times) * 1e3:.1f} | {row.first:.2f} | {speedup} | {ratio} | {row.note} |")


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, "",
             "| mode | path | strategy | token density | ms / forward (median) | min ms | first call s | "
             "vs own unpatched | native / adapter | check |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines.extend(markdown_row(r, rows) for r in rows)
    return "\n".join(lines)


def summary(rows: list[Row]) -> list[str]:
    """One line per mode and strategy: native / adapter and whether it is within 5% (issue #6)."""
    lines = []
    for row in rows:
        other = partner(rows, row) if row.path.startswith("native") and row.times else None
        if other is None:
            continue
        ratio = row.median / other.median
        verdict = "native at most 5% slower: passes" if ratio <= 1.05 else \
            f"native {100 * (ratio - 1):.0f}% slower: fails"
        what = "no patch: ComfyUI's model code vs diffusers'" if row.strategy == "unpatched" else "issue #6 acceptance"
        lines.append(f"- {row.mode}, {row.strategy}: native / adapter = {ratio:.3f} ({verdict}; {what})")
    return lines


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="wan13b", choices=sorted(CASES))
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per row (median), after --warmup")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per row (the first is reported)")
    parser.add_argument("--sections", default="eager,compiled", help="comma list of eager, compiled")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (TorchCompileModel: "
                                                               "inductor or cudagraphs)")
    parser.add_argument("--density", type=float, default=DENSITY, help="token density of the sparse strategy")
    parser.add_argument("--budget", type=float, help="seconds after which rows not yet started are skipped")
    parser.add_argument("--tiny", action="store_true", help="tiny Wan on the CPU, fp32, reference kernel")
    parser.add_argument("--tiny-layers", type=int, default=TINY_CONFIG["num_layers"],
                        help="blocks of the --tiny model (more than dynamo's recompile limit of 8 shows "
                             "whether compiled blocks fall back to eager)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    if not sections or any(s not in ("eager", "compiled") for s in sections):
        parser.error("--sections takes eager and/or compiled")
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be >= 1")
    if args.tiny:
        config = dict(TINY_CONFIG, num_layers=args.tiny_layers)
        case = Case(f"tiny Wan (2 heads x 128, {args.tiny_layers} layers)", config, TINY.latent, TINY.text)
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        case, device, dtype = CASES[args.model], torch.device("cuda"), torch.bfloat16
    else:
        parser.error("no CUDA GPU: run with --tiny for the CPU functional check")
    where = "CPU, fp32, reference kernel" if args.tiny else f"{torch.cuda.get_device_name()}, bf16, SDPA preferring cuDNN"

    def report(rows: list[Row]) -> str:
        try:
            from comfyui_version import __version__ as comfy_version
        except ImportError:
            comfy_version = "?"
        header = (f"ComfyUI native Wan + Apply Strategy vs diffusers adapter: {case.label}, {where}, torch "
                  f"{torch.__version__}, ComfyUI {comfy_version}, compile backend {args.backend}, median of "
                  f"{args.repeats} after {args.warmup} warm-up, {time.strftime('%Y-%m-%d')}")
        return "\n".join([markdown(rows, header), "", *summary(rows)])

    def keep_partial(rows: list[Row]) -> None:  # a run killed by its timeout keeps what it measured
        if args.out:
            with open(args.out, "w") as f:
                f.write(report(rows) + "\n")

    rows = run(case, tiny=args.tiny, repeats=args.repeats, warmup=args.warmup, sections=sections,
               backend=args.backend, budget=args.budget, density=args.density, device=device, dtype=dtype,
               on_row=keep_partial)
    return emit(report(rows), args.out)


if __name__ == "__main__":
    main()
