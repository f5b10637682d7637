"""Attention benchmark on the GPU (bf16, B=1) at the four real video shapes.

Side by side in one run: torch SDPA (cuDNN, flash), SageAttention 1.0.6 (if importable), our
kernel in dense mode, each pattern family at several token densities and a mixed layer, and
FlexAttention on the identical block mask (its BlockMask is built from our tables, its mask_mod
evaluates the same rule). Each sparse output is checked against float32 on sampled query rows.

    python3 -m sparse_vdit.bench.attention [--shapes wan13b,wan14b,hunyuan,cogvideox]
        [--densities 0.05,0.15,0.3,0.5] [--families local_window,...] [--tiles 128x64]
        [--flex-shapes ...] [--cube-walks] [--paired-tiles] [--fast-start] [--gluon [MODES]] [--out DIR]
        [--quick]

--quick: Wan2.1-1.3B and CogVideoX1.5, local windows only, densities 0.1 and 0.3, cuDNN baseline, no
Flex (a few minutes of GPU time). Each sparse row's note names the head orders the plan chose (fm,
sm, cube) and the full / partial tile counts. --cube-walks also times every layer with cube-order
heads under each walk the autotuner chooses between (SPARSE_VDIT_MERGED_CUBE=0 and =only), as
extra rows named "... [loop per run]" and "... [merged walk]"; --paired-tiles times every row, dense
included, with full tiles one and two a step (SPARSE_VDIT_PAIRED_TILES=0 and =only), as rows named
"... [single tiles]" and "... [paired tiles]"; --fast-start times every row with the Gluon kernel's
q-tile walk started by a loop over its runs and by vector loads of them with Q stored after the first
K/V loads (SPARSE_VDIT_GLUON_FAST_START=0 and =1), as rows "... [walk start]" and "... [fast start]";
--gluon times every row with the Triton kernel and
with the Gluon kernel (kernels/gluon_attention.py) uncapped, capped at 128 registers and
warp-specialized (SPARSE_VDIT_GLUON=0, =1, =r128 and =ws; --gluon 0,ws times only those two) too,
as rows named "... [triton]", "... [gluon]", "... [gluon r128]" and "... [gluon ws]"; the rows
without a bracket run the product's default (Gluon r128 at head_dim 64 on sm_90, the Triton kernel
otherwise).

Prints a markdown table last and writes it (and the rows as JSON) to --out (default $OUT or .).
Every row is also logged as it is measured (attention_log.txt); `--table-from LOG` prints the table
of a run a timeout cut before its end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import time
import traceback

import torch
import triton

from ..kernels import rule as R
from ..kernels import rule_mask
from ..kernels.triton_attention import tuned_config_name
from ..strategies.geometry import VideoGeometry
from ..strategies.patterns import FAMILIES, Dense, Skip, pattern_for_density
from ..strategies.plan import clear_plans, compile_layer, full_tiles, visited_tiles

SHAPES = {  # name: (label, geometry, heads, head_dim)
    "wan13b": ("Wan2.1-1.3B 480p", VideoGeometry(frames=21, height=30, width=52), 12, 128),
    "wan14b": ("Wan2.1-14B 720p", VideoGeometry(frames=21, height=45, width=80), 40, 128),
    "hunyuan": ("HunyuanVideo 720p", VideoGeometry(frames=33, height=45, width=80, suffix=256), 24, 128),
    "cogvideox": ("CogVideoX1.5 768p", VideoGeometry(frames=11, height=48, width=85, prefix=226), 48, 64),
}


def time_ms(fn) -> float:
    """Median milliseconds of fn() by triton.testing.do_bench."""
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def sampled_error(out, q, k, v, head_rules, geom: VideoGeometry, rows: int = 32) -> float:
    """Largest per-head relative error of out ([1,H,L,D]) vs float32 on sampled query rows."""
    L = geom.seq_len
    idx = torch.tensor(sorted(random.Random(L).sample(range(L), rows)), device=q.device)
    keys = torch.arange(L, device=q.device)
    rules = head_rules.cpu().tolist()
    worst = 0.0
    for h, rule in enumerate(rules):
        got = out[0, h, idx].float()
        if rule[R.ORDER] == R.SKIP_HEAD:
            worst = max(worst, 0.0 if torch.equal(got, torch.zeros_like(got)) else float("inf"))
            continue
        m = rule_mask(rule, geom.prefix, geom.frames, geom.height, geom.width, idx, keys)
        s = (q[0, h, idx].float() @ k[0, h].float().T) * q.shape[-1] ** -0.5
        want = s.masked_fill(~m, float("-inf")).softmax(-1) @ v[0, h].float()
        worst = max(worst, rel_err(got, want))
    return worst


ORDER_NAMES = {R.FRAME_MAJOR: "fm", R.SPACE_MAJOR: "sm", R.CUBE: "cube"}


def tile_summary(tables) -> str:
    """Head orders and full / partial tile counts of a layer's tables, e.g. 'cube x12; 4571 full, 14187 partial'."""
    rules = tables.head_rules.cpu().tolist()
    row_ptr, runs = tables.row_ptr.cpu().numpy(), tables.runs.cpu().numpy()
    orders, full, visited = {}, 0, 0
    for r in rules:
        if r[R.ORDER] == R.SKIP_HEAD:
            continue
        name = ORDER_NAMES[r[R.ORDER]]
        orders[name] = orders.get(name, 0) + 1
        mine = runs[row_ptr[r[R.ROW_BASE]]:row_ptr[r[R.ROW_BASE] + tables.num_q_tiles]]
        full, visited = full + full_tiles(mine), visited + visited_tiles(mine)
    names = " ".join(f"{k} x{v}" for k, v in orders.items())
    return f"{names}; {full} full, {visited - full} partial"


def tile_masks(tables) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (head, q-tile, k-tile): visited-partial and full booleans [H, nq, nk] from the runs."""
    dev = tables.runs.device
    nq, nk = tables.num_q_tiles, tables.num_k_tiles
    row_ptr, runs = tables.row_ptr.long(), tables.runs.long()
    n_rows = row_ptr.numel() - 1
    run_row = torch.repeat_interleave(torch.arange(n_rows, device=dev), row_ptr[1:] - row_ptr[:-1])
    masks = []
    for want_full in (0, 1):
        sel = runs[:, 2] == want_full
        cover = torch.zeros(n_rows, nk + 1, dtype=torch.int32, device=dev)
        ones = torch.ones(int(sel.sum()), dtype=torch.int32, device=dev)
        cover.index_put_((run_row[sel], runs[sel, 0]), ones, accumulate=True)
        cover.index_put_((run_row[sel], runs[sel, 1]), -ones, accumulate=True)
        masks.append(cover.cumsum(1)[:, :nk] > 0)
    rows = tables.head_rules[:, R.ROW_BASE].long()[:, None] + torch.arange(nq, device=dev)[None, :]
    active = (tables.head_rules[:, R.ORDER] != R.SKIP_HEAD)[:, None, None]
    return masks[0][rows] & active, masks[1][rows] & active


class FlexOnTables:
    """FlexAttention on exactly our tiles: BlockMask.from_kv_blocks + a mask_mod of the same rule,
    run on q/k/v in each head's physical order (the permutation is not timed)."""

    def __init__(self, geom: VideoGeometry, heads: int, device):
        from torch.nn.attention.flex_attention import flex_attention

        self.geom = geom
        self.rules = torch.zeros(heads, R.RULE_INTS, dtype=torch.int32, device=device)
        self.cube_map = R.cube_order_map(geom.frames, geom.height, geom.width).to(device)
        self.flex = torch.compile(flex_attention, dynamic=False)
        self.mask_mod = self._make_mask_mod()

    def _make_mask_mod(self):
        g = self.geom
        prefix, F, W, P, N = g.prefix, g.frames, g.width, g.tokens_per_frame, g.grid_tokens
        rules, cube_map = self.rules, self.cube_map

        def logical(p, order):
            gp = p - prefix
            on = (gp >= 0) & (gp < N)
            gs = torch.where(on, gp, 0)
            grid = torch.where(order == 1, (gs % F) * P + gs // F, torch.where(order == 2, cube_map[gs], gs))
            return torch.where(on, prefix + grid, p)

        def mask_mod(b, h, q_idx, kv_idx):
            r = rules[h]
            lq, lk = logical(q_idx, r[R.ORDER]), logical(kv_idx, r[R.ORDER])
            gq, gk = lq - prefix, lk - prefix
            fq, sq, fk, sk = gq // P, gq % P, gk // P, gk % P
            df, ds = (fq - fk).abs(), (sq - sk).abs()
            dy, dx = (sq // W - sk // W).abs(), (sq % W - sk % W).abs()
            m = (gq < 0) | (gq >= N) | (gk < 0) | (gk >= N) | (lq == lk)
            m = m | ((r[R.DIAG] >= 0) & ((gq - gk).abs() <= r[R.DIAG]))
            m = m | ((r[R.MD_S] >= 0) & (ds <= r[R.MD_S]) & (df <= r[R.MD_T]))
            m = m | ((r[R.WIN_F] >= 0) & (df <= r[R.WIN_F]) & (dy <= r[R.WIN_Y]) & (dx <= r[R.WIN_X]))
            m = m | (gk < r[R.STRIPE_FIRST])
            for c in range(R.MAX_COLS):
                m = m | ((r[R.N_COLS] > c) & (gk >= r[R.COLS + 2 * c]) & (gk < r[R.COLS + 2 * c + 1]))
            return m

        return mask_mod

    def prepare(self, plan, q, k, v):
        """(fn running flex on this plan, output-to-logical-order function)."""
        from torch.nn.attention.flex_attention import BlockMask

        tables = plan.tables
        self.rules.copy_(tables.head_rules)
        partial, full = tile_masks(tables)

        def indices(mask):
            counts = mask.sum(-1, dtype=torch.int32)[None]
            order = torch.sort(mask.to(torch.uint8), dim=-1, descending=True, stable=True).indices
            return counts.contiguous(), order.to(torch.int32)[None].contiguous()

        kv_num, kv_idx = indices(partial)
        full_num, full_idx = indices(full)
        L = self.geom.seq_len
        block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx,
                                              BLOCK_SIZE=(tables.block_m, tables.block_n),
                                              mask_mod=self.mask_mod, seq_lengths=(L, L),
                                              compute_q_blocks=False)
        perms = self._perms(tables, q.device)
        qp, kp, vp = (torch.stack([t[0, h, perms[h]] for h in range(t.shape[1])])[None] for t in (q, k, v))
        options = {"BLOCK_M": tables.block_m, "BLOCK_N": tables.block_n}

        def run():
            return self.flex(qp, kp, vp, block_mask=block_mask, kernel_options=options)

        try:
            run()
        except Exception:  # this torch may name its tile options differently: use its defaults
            options = None
            run()

        def to_logical(out):
            res = torch.empty_like(out)
            for h in range(out.shape[1]):
                res[0, h, perms[h]] = out[0, h]
            return res

        return run, to_logical

    def _perms(self, tables, device):
        g = self.geom
        phys = torch.arange(g.seq_len, device=device)
        orders = tables.head_rules[:, R.ORDER].cpu().tolist()
        return [R.physical_to_logical(phys, max(o, 0), g.prefix, g.frames, g.height, g.width) for o in orders]


def mixed_layer(heads: int, geom: VideoGeometry) -> tuple:
    """A plausible searched layer: dense, skip and every family at 0.1-0.3 density."""
    menu = [Dense(), Skip()] + [pattern_for_density(f, d, geom) for f, d in
                                (("diagonal", 0.2), ("multi_diagonal", 0.15), ("local_window", 0.2),
                                 ("vertical_stripe", 0.1), ("diagonal", 0.1), ("multi_diagonal", 0.3))]
    return tuple(menu[h % len(menu)] for h in range(heads))


CUBE_WALKS = (("0", "loop per run"), ("only", "merged walk"))  # SPARSE_VDIT_MERGED_CUBE values
PAIRINGS = (("0", "single tiles"), ("only", "paired tiles"))  # SPARSE_VDIT_PAIRED_TILES values
GLUON_MODES = (("0", "triton"), ("1", "gluon"), ("r128", "gluon r128"), ("ws", "gluon ws"))  # SPARSE_VDIT_GLUON
STARTS = (("0", "walk start"), ("1", "fast start"))  # SPARSE_VDIT_GLUON_FAST_START


def forced_choices(tables, cube_walks: bool, paired_tiles: bool, gluon: tuple[str, ...] = (),
                   fast_start: bool = False) -> list:
    """(environment variable, value, row label) of each forced kernel choice a layer's row is also
    timed under: the cube-order walks where its tables have cube-order heads, the full-tile pairings,
    the kernels of the `gluon` modes (SPARSE_VDIT_GLUON values), the Gluon kernel's two ways of
    starting a q-tile's walk."""
    forced = [("SPARSE_VDIT_GLUON", mode, label) for mode, label in GLUON_MODES if mode in gluon]
    if fast_start:
        forced += [("SPARSE_VDIT_GLUON_FAST_START", mode, label) for mode, label in STARTS]
    if cube_walks and tables.uses_cube_order():
        forced += [("SPARSE_VDIT_MERGED_CUBE", mode, label) for mode, label in CUBE_WALKS]
    if paired_tiles:
        forced += [("SPARSE_VDIT_PAIRED_TILES", mode, label) for mode, label in PAIRINGS]
    return forced


@contextlib.contextmanager
def env_set(name: str, value: str):
    """Set one environment variable inside the block, restoring it after."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def bench_shape(shape: tuple, densities, tiles, rows: list, log, device="cuda", dtype=torch.bfloat16,
                use_flex: bool = True, baselines=("cudnn", "flash", "sage"), families=FAMILIES,
                cube_walks: bool = False, paired_tiles: bool = False, gluon: tuple[str, ...] = (),
                fast_start: bool = False) -> None:
    """Time and check every variant at one (label, geometry, heads, head_dim); rows appended."""
    label, geom, H, D = shape
    L = geom.seq_len
    dev = torch.device(device)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, L, D, device=dev, dtype=dtype) for _ in range(3))
    pair_flops = 4 * D  # per attended (q, k) pair and head: QK^T and PV

    def add(variant, ms, token_density, tile_density=None, flex_ms=None, err=None, note="", efficiency=None):
        row = dict(shape=label, L=L, H=H, D=D, variant=variant, ms=ms, token_density=token_density,
                   tile_density=tile_density, flex_ms=flex_ms, err=err, note=note, efficiency=efficiency,
                   tflops=pair_flops * H * token_density * L * L / (ms * 1e-3) / 1e12 if ms else None)
        rows.append(row)
        log(json.dumps(row))
        return row

    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    dense_ref = None
    for name, backend in (("cuDNN SDPA", SDPBackend.CUDNN_ATTENTION), ("flash SDPA", SDPBackend.FLASH_ATTENTION)):
        if name.split()[0].lower() not in baselines:
            continue
        try:
            with sdpa_kernel(backend):
                out = sdpa(q, k, v)
                ms = time_ms(lambda: sdpa(q, k, v))
            dense_ref = out if dense_ref is None else dense_ref
            add(name, ms, 1.0, 1.0)
        except Exception as e:  # a backend missing on this build is reported, not fatal
            add(name, None, 1.0, note=f"failed: {type(e).__name__}: {e}"[:200])

    def dense_err(out):
        """Relative error of a dense output against the first SDPA baseline's (None without one)."""
        return rel_err(out, dense_ref) if dense_ref is not None else None

    try:
        if "sage" not in baselines:
            raise ImportError("not asked for")
        from sageattention import sageattn

        out = sageattn(q, k, v, tensor_layout="HND", is_causal=False)
        add("SageAttention 1.0.6", time_ms(lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=False)),
            1.0, 1.0, err=dense_err(out))
    except Exception as e:
        add("SageAttention 1.0.6", None, 1.0, note=f"skipped: {type(e).__name__}: {e}"[:200])

    flex = None
    try:
        flex = FlexOnTables(geom, H, dev) if use_flex else None
    except Exception as e:
        log(f"flex unavailable: {e}")
    for bm, bn in tiles:
        tag = f" {bm}x{bn}"
        dense_plan = compile_layer((Dense(),) * H, geom, bm, bn, dev)
        out = dense_plan.run(q, k, v)
        dense_ms = time_ms(lambda: dense_plan.run(q, k, v))
        add("ours dense" + tag, dense_ms, 1.0, dense_plan.tile_density,
            err=dense_err(out), note=tuned_config_name())
        for var, mode, choice in forced_choices(dense_plan.tables, False, paired_tiles, gluon, fast_start):
            with env_set(var, mode):
                out = dense_plan.run(q, k, v)
                ms = time_ms(lambda: dense_plan.run(q, k, v))
            add(f"ours dense{tag} [{choice}]", ms, 1.0, dense_plan.tile_density,
                err=dense_err(out), note=tuned_config_name())
        configs = [(f"{fam} {d:g}", (pattern_for_density(fam, d, geom),) * H)
                   for fam in families for d in densities]
        if tuple(families) == tuple(FAMILIES):
            configs.append(("mixed layer", mixed_layer(H, geom)))
        for name, patterns in configs:
            t0 = time.perf_counter()
            plan = compile_layer(patterns, geom, bm, bn, dev)
            compile_s = time.perf_counter() - t0
            token_density = sum(plan.densities) / H
            out = plan.run(q, k, v, dense=sdpa)  # as the engine runs it: a mixed layer's dense heads on SDPA
            ms = time_ms(lambda: plan.run(q, k, v, dense=sdpa))
            err = sampled_error(out, q, k, v, plan.head_rules, geom)
            flex_ms, note = None, f"plan {compile_s * 1e3:.0f} ms; {tile_summary(plan.tables)}; {tuned_config_name()}"
            if name != "mixed layer":
                note += f"; {patterns[0]}"
            if flex is not None:
                try:
                    # Flex's block masks need q-tiles at multiples of block_m: the same token mask,
                    # classified on that tiling
                    uniform = compile_layer(patterns, geom, bm, bn, dev, segment_q_tiles=False)
                    run, to_logical = flex.prepare(uniform, q, k, v)
                    fout = to_logical(run())
                    flex_ms = time_ms(run)
                    live = [h for h in range(H) if not isinstance(patterns[h], Skip)]
                    note += f"; flex vs ours {rel_err(fout[:, live], out[:, live]):.1e}"
                except Exception as e:
                    note += f"; flex failed: {type(e).__name__}: {str(e)[:120]}"
                    log(traceback.format_exc())
            add(name + tag, ms, token_density, plan.tile_density, flex_ms, err, note,
                efficiency=token_density * dense_ms / ms)
            for var, mode, choice in forced_choices(plan.tables, cube_walks, paired_tiles, gluon, fast_start):
                with env_set(var, mode):
                    err = sampled_error(plan.run(q, k, v, dense=sdpa), q, k, v, plan.head_rules, geom)
                    ms = time_ms(lambda: plan.run(q, k, v, dense=sdpa))
                add(f"{name}{tag} [{choice}]", ms, token_density, plan.tile_density, err=err,
                    note=tuned_config_name(), efficiency=token_density * dense_ms / ms)
        clear_plans()
    del q, k, v
    torch.cuda.empty_cache()


def rows_from_log(path: str) -> list:
    """The benchmark rows an attention_log.txt holds (one JSON object per line; other lines skipped)."""
    rows = []
    with open(path) as fh:
        for line in fh:
            if line.startswith("{"):
                row = json.loads(line)
                if "variant" in row:
                    rows.append(row)
    return rows


def markdown(rows: list) -> str:
    dense = {}
    for r in rows:
        if r["variant"] == "cuDNN SDPA" and r["ms"]:
            dense[r["shape"]] = r["ms"]
    lines = ["| shape | variant | token dens | tile dens | ms | TFLOP/s (attended) | efficiency | "
             "speed vs cuDNN | Flex ms | Flex/ours | err | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt):
        return "" if x is None else format(x, fmt)

    for r in rows:
        cudnn = dense.get(r["shape"])
        vs = cudnn / r["ms"] if cudnn and r["ms"] else None
        fx = r["flex_ms"] / r["ms"] if r.get("flex_ms") and r["ms"] else None
        lines.append(f"| {r['shape']} | {r['variant']} | {f(r['token_density'], '.3f')} | "
                     f"{f(r['tile_density'], '.3f')} | {f(r['ms'], '.2f')} | {f(r['tflops'], '.0f')} | "
                     f"{f(r.get('efficiency'), '.2f')} | {f(vs, '.2f')} | {f(r.get('flex_ms'), '.2f')} | "
                     f"{f(fx, '.2f')} | {f(r['err'], '.1e')} | {r['note']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--densities", default="0.05,0.15,0.3,0.5")
    ap.add_argument("--tiles", default="", help="e.g. 128x64,128x128 (default: preferred_tiles)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--baselines", default="cudnn,flash,sage", help="dense baselines to time")
    ap.add_argument("--flex-shapes", default=None,
                    help="shapes that get the FlexAttention column (default: all; '' for none)")
    ap.add_argument("--families", default=",".join(FAMILIES), help="pattern families (the mixed layer "
                    "runs only with all of them)")
    ap.add_argument("--cube-walks", action="store_true",
                    help="also time layers with cube-order heads under each cube-order walk")
    ap.add_argument("--paired-tiles", action="store_true",
                    help="also time every row with full tiles one and two a step")
    ap.add_argument("--gluon", nargs="?", const=",".join(m for m, _ in GLUON_MODES), default="", metavar="MODES",
                    help="also time every row with each kernel of these SPARSE_VDIT_GLUON modes (default all: "
                         f"{', '.join(f'{m} = {label}' for m, label in GLUON_MODES)})")
    ap.add_argument("--fast-start", action="store_true",
                    help="also time every row with the Gluon kernel's q-tile walk started by a loop over its "
                         "runs and by vector loads, Q stored after the first K/V loads "
                         "(SPARSE_VDIT_GLUON_FAST_START=0 and =1)")
    ap.add_argument("--quick", action="store_true",
                    help="wan13b,cogvideox; local_window at 0.1,0.3; cuDNN baseline; no Flex")
    ap.add_argument("--table-from", metavar="LOG",
                    help="print the table of the rows in an attention_log.txt (a run cut by a timeout "
                         "prints none) and exit; needs no GPU")
    args = ap.parse_args(argv)
    if args.table_from:
        print(markdown(rows_from_log(args.table_from)))
        return
    if args.quick:
        args.shapes, args.densities, args.families = "wan13b,cogvideox", "0.1,0.3", "local_window"
        args.baselines, args.flex_shapes = "cudnn", ""
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    gluon_modes = tuple(m for m in args.gluon.split(",") if m)
    unknown = sorted(set(gluon_modes) - {m for m, _ in GLUON_MODES})
    if unknown:
        raise SystemExit(f"unknown --gluon modes {unknown}; known: {', '.join(m for m, _ in GLUON_MODES)}")
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention.py needs a CUDA GPU")
    from ..kernels import preferred_tiles

    densities = [float(x) for x in args.densities.split(",") if x]
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "attention_log.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    log(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {torch.cuda.get_device_name()} torch {torch.__version__} "
        f"triton {triton.__version__}")
    rows: list = []
    for key in args.shapes.split(","):
        D = SHAPES[key][3]
        tiles = ([tuple(int(x) for x in t.split("x")) for t in args.tiles.split(",")] if args.tiles
                 else [preferred_tiles(D, "cuda")])
        try:
            use_flex = args.flex_shapes is None or key in args.flex_shapes.split(",")
            bench_shape(SHAPES[key], densities, tiles, rows, log, use_flex=use_flex,
                        baselines=args.baselines.split(","), families=families, cube_walks=args.cube_walks,
                        paired_tiles=args.paired_tiles, gluon=gluon_modes, fast_start=args.fast_start)
        except Exception:
            log(traceback.format_exc())
        with open(os.path.join(args.out, "attention_rows.json"), "w") as fh:
            json.dump(rows, fh, indent=1)
    table = markdown(rows)
    with open(os.path.join(args.out, "attention.md"), "w") as fh:
        fh.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
