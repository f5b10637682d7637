"""Attention error of cell-aligned 3D windows vs token-centred 3D windows at equal density.

    python3 -m sparse_vdit.bench.cell_window_error [--out FILE] [--prompts 2] [--steps 8] [--stride 7]
    python3 -m sparse_vdit.bench.cell_window_error --tiles [--out FILE]

A token window (LocalWindow semantics) attends every key with |df| <= rf, |dy| <= ry, |dx| <= rx
around the query. A cell window (as in Sliding Tile Attention) cuts the grid into cells of
cf x cy x cx tokens (the last cell of an axis is ragged when the size does not divide it) and
attends every key whose cell lies within (a, b, c) cells of the query's cell, cell coordinates
being token coordinates // cell size. Every (query cell, key cell) pair is then attended in full
or not at all. The token window is the cell window of cell (1, 1, 1).

Both are fitted to each target density by one rule (that of `pattern_for_density("local_window")`):
a frame reach and a spatial reach in tokens, the cell radius on each axis being reach / cell size
rounded half up; the frame reach is the smallest whose full-frame window reaches the target, then
the spatial reach whose exact token density (attended (query, key) grid pairs over all) is closest
to it. Cells make densities coarse, so each cell shape is also measured at the two windows of that
frame reach whose densities bracket the token window's, and its error at exactly the token
window's density is interpolated linearly in density between them.

The learned testbed model samples held-out prompts (seed 0) dense; at every self-attention call
(both CFG branches) a controller takes every `stride`-th query row and computes the softmax in
float64, then in float32 the dense attention output and the output under each window (softmax
renormalised over the window). Per (layer, head) the error is the pooled relative L2 error
sqrt(sum |O_win - O_dense|^2 / sum |O_dense|^2) over rows, calls and batch, also split into early /
mid / late thirds of the steps. Prints markdown tables (and writes them to --out).

--tiles (no model, seconds) counts instead what each window costs the kernel at the real models' grid
sizes and 128 x 64 tiles: visited and masked tiles of the token window (the plan compiler's, in the
order it picks), of a cell window whose cells are the cube order's 8 x 8-token cubes (no padding:
ragged cubes and frames cut through tiles) and of one whose 8 x 16-token cells are each padded to one
128-row q-tile (two 64-key k-tiles; every visited tile full but for pad keys, tiles of pads alone
skipped), and the efficiency each
could reach if every visited tile ran at the dense rate (token density / visited-tile density against
the unpadded layer's tiles).
"""

from __future__ import annotations

import argparse
import datetime
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..kernels.rule import CUBE_EDGE, cube_order_map
from ..strategies.geometry import VideoGeometry
from ..strategies.patterns import pattern_for_density
from ..strategies.plan import compile_layer, full_tiles, visited_tiles
from ..testbed.data import HELD_OUT
from ..testbed.generate import SAMPLE_STEPS, generate
from ..testbed.head_stats import grid_call_views
from ..testbed.model import WEIGHTS_DIR, load_testbed, testbed_geometry

TOKEN_CELL = (1, 1, 1)
CELLS = ((1, 4, 4), (1, 2, 8), (3, 4, 4), (1, 8, 8))
TARGETS = (0.05, 0.1, 0.15, 0.2, 0.3)
THRESHOLDS = (0.1, 0.2, 0.3, 0.5)
PROMPTS = 2
BUCKETS = ("early", "mid", "late")


def _cell_coords(g: torch.Tensor, geom: VideoGeometry, cell: Sequence[int]) -> torch.Tensor:
    """[n, 3] cell coordinates (f // cf, y // cy, x // cx) of grid indices `g`."""
    P, W = geom.tokens_per_frame, geom.width
    f, y, x = g // P, (g % P) // W, g % W
    return torch.stack([f // cell[0], y // cell[1], x // cell[2]], -1)


def cell_window_mask(geom: VideoGeometry, cell: Sequence[int], radii: Sequence[int], rows=None) -> torch.Tensor:
    """bool [len(rows) or N, N] over grid tokens: query attends key iff their cells are within `radii`
    cells on every axis (frame, row, column)."""
    keys = torch.arange(geom.grid_tokens)
    rows = keys if rows is None else torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
    qc, kc = _cell_coords(rows, geom, cell), _cell_coords(keys, geom, cell)
    return ((qc[:, None, :] - kc[None, :, :]).abs() <= torch.tensor(radii)).all(-1)


def _axis_pairs(n: int, size: int, radius: int) -> int:
    """Pairs (i, j) of 0..n-1 with |i // size - j // size| <= radius."""
    c = np.arange(n) // size
    return int((np.minimum(n, (c + radius + 1) * size) - np.maximum(0, (c - radius) * size)).sum())


def cell_window_density(geom: VideoGeometry, cell: Sequence[int], radii: Sequence[int]) -> float:
    """Exact fraction of the N*N grid (query, key) pairs the cell window attends."""
    pairs = math.prod(_axis_pairs(n, s, r) for n, s, r in zip((geom.frames, geom.height, geom.width), cell, radii))
    return pairs / geom.grid_tokens ** 2


def cell_radii(cell: Sequence[int], frame_reach: int, spatial_reach: int) -> tuple[int, int, int]:
    """Cell radii of token reaches (frames, rows and columns): reach / cell size rounded half up."""
    return tuple((r + s // 2) // s for r, s in zip((frame_reach, spatial_reach, spatial_reach), cell))


@dataclass(frozen=True)
class Window:
    """One window: its cell shape (TOKEN_CELL for the token window), cell radii and exact density."""

    cell: tuple[int, int, int]
    radii: tuple[int, int, int]
    density: float

    @property
    def label(self) -> str:
        """'token' or 'cell FxHxW'."""
        return "token" if self.cell == TOKEN_CELL else "cell " + "x".join(map(str, self.cell))


def _window(geom: VideoGeometry, cell: Sequence[int], frame_reach: int, spatial_reach: int) -> Window:
    radii = cell_radii(cell, frame_reach, spatial_reach)
    return Window(tuple(cell), radii, cell_window_density(geom, cell, radii))


def frame_reach_for(geom: VideoGeometry, cell: Sequence[int], target: float) -> int:
    """The smallest frame reach whose full-frame window of `cell` reaches `target` (else the largest)."""
    side = max(geom.height, geom.width)
    return next((f for f in range(geom.frames) if _window(geom, cell, f, side).density >= target), geom.frames - 1)


def spatial_family(geom: VideoGeometry, cell: Sequence[int], frame_reach: int) -> list[Window]:
    """The windows of `cell` at `frame_reach` for spatial reach 0, 1, ... up to the frame side."""
    return [_window(geom, cell, frame_reach, r) for r in range(max(geom.height, geom.width) + 1)]


def match_density(geom: VideoGeometry, cell: Sequence[int], target: float) -> Window:
    """The window of `cell` whose density is closest to `target` at the frame reach of
    `frame_reach_for` (ties go to the smaller spatial reach)."""
    family = spatial_family(geom, cell, frame_reach_for(geom, cell, target))
    return min(family, key=lambda w: abs(w.density - target))


def bracket(geom: VideoGeometry, cell: Sequence[int], target: float, density: float) -> tuple[Window, Window]:
    """The windows of `cell` at the target's frame reach with the nearest densities <= and >= `density`
    (the family's end when none is on that side)."""
    family = spatial_family(geom, cell, frame_reach_for(geom, cell, target))
    below = [w for w in family if w.density <= density]
    above = [w for w in family if w.density >= density]
    lower = max(below, key=lambda w: w.density) if below else family[0]
    upper = min(above, key=lambda w: w.density) if above else family[-1]
    return lower, upper


def interpolate(lower: tuple[float, torch.Tensor], upper: tuple[float, torch.Tensor], density: float) -> torch.Tensor:
    """Values linear in density between (density, values) points, clamped to their range."""
    (d0, v0), (d1, v1) = lower, upper
    w = 0.0 if d1 == d0 else min(1.0, max(0.0, (density - d0) / (d1 - d0)))
    return v0 + (v1 - v0) * w


@dataclass(frozen=True)
class Comparison:
    """A target density, the token window nearest to it, and one cell shape's nearest and bracketing
    windows (bracketing the token window's density)."""

    target: float
    token: Window
    nearest: Window
    lower: Window
    upper: Window


def comparisons(geom: VideoGeometry, cells: Sequence[Sequence[int]] = CELLS,
                targets: Sequence[float] = TARGETS) -> list[Comparison]:
    """One Comparison per (target, cell shape)."""
    out = []
    for t in targets:
        token = match_density(geom, TOKEN_CELL, t)
        out += [Comparison(t, token, match_density(geom, c, t), *bracket(geom, c, t, token.density)) for c in cells]
    return out


def measured_windows(plan: Sequence[Comparison]) -> list[Window]:
    """Every distinct window the comparisons need, in order of first use."""
    return list(dict.fromkeys(w for c in plan for w in (c.token, c.nearest, c.lower, c.upper)))


class WindowErrors:
    """Controller: runs attention dense and accumulates each window's output error on sampled rows."""

    def __init__(self, windows: Sequence[Window], layers: int, heads: int, steps: int, query_stride: int = 7):
        if query_stride < 1:
            raise ValueError(f"query_stride must be >= 1, got {query_stride}")
        self.windows, self.layers, self.heads = list(windows), layers, heads
        self.steps, self.query_stride, self.bucket = steps, query_stride, 0
        shape = (len(self.windows), layers, heads, len(BUCKETS))
        self.err_sq = torch.zeros(shape, dtype=torch.float64)
        self.mass = torch.zeros(shape, dtype=torch.float64)  # summed over rows: softmax mass inside
        self.ref_sq = torch.zeros(shape[1:], dtype=torch.float64)
        self.rows_seen = torch.zeros(shape[1:], dtype=torch.float64)
        self.reference_gap = 0.0  # worst relative L2 gap between the model's dense output and ours
        self._masks: tuple[VideoGeometry, torch.Tensor, torch.Tensor] | None = None

    def begin_step(self, sigma: float, step: int) -> None:
        """Pick the step bucket (thirds of the run) of the coming calls."""
        self.bucket = step_bucket(step, self.steps)

    def _rows_and_masks(self, geom: VideoGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        if self._masks is None or self._masks[0] != geom:
            rows = torch.arange(0, geom.grid_tokens, self.query_stride)
            masks = torch.stack([cell_window_mask(geom, w.cell, w.radii, rows) for w in self.windows])
            self._masks = (geom, rows, masks.float())
        return self._masks[1], self._masks[2]

    def attention(self, q, k, v, *, layer, sigma, geometry: VideoGeometry, layout, dense, kv_len=None):
        qh, kh, vh = grid_call_views(self, (q, k, v), layer, geometry, layout)
        out = dense(q, k, v)
        oh = out if layout == "bhld" else out.transpose(1, 2)
        rows, masks = self._rows_and_masks(geometry)
        scores = qh[:, :, rows].double() @ kh.double().transpose(-1, -2) / math.sqrt(qh.shape[-1])
        probs, vh = torch.softmax(scores, dim=-1).float(), vh.float().contiguous()  # [B, h, R, L], [B, h, L, D]
        ref = probs @ vh
        gap = (oh[:, :, rows].double() - ref.double()).norm() / ref.double().norm()
        self.reference_gap = max(self.reference_gap, float(gap))
        b = self.bucket
        self.ref_sq[layer, :, b] += ref.double().pow(2).sum((0, 2, 3))
        self.rows_seen[layer, :, b] += probs.shape[0] * probs.shape[2]
        for i, mask in enumerate(masks):
            kept = probs * mask
            mass = kept.sum(-1, keepdim=True)
            self.err_sq[i, layer, :, b] += ((kept @ vh) / mass - ref).double().pow(2).sum((0, 2, 3))
            self.mass[i, layer, :, b] += mass.double().sum((0, 2, 3))
        return out

    def head_errors(self, bucket: int | None = None) -> torch.Tensor:
        """Relative L2 error per (window, layer * heads + head), over every bucket or one."""
        sl = slice(None) if bucket is None else slice(bucket, bucket + 1)
        ref = self.ref_sq[..., sl].sum(-1)
        if (ref == 0).any():
            raise ValueError("WindowErrors: some (layer, head) recorded no attention call")
        return (self.err_sq[..., sl].sum(-1) / ref).sqrt().flatten(1)

    def head_mass(self) -> torch.Tensor:
        """Mean softmax mass inside each window per (window, layer * heads + head)."""
        return (self.mass.sum(-1) / self.rows_seen.sum(-1)).flatten(1)


def cube_cell_tiles(geom: VideoGeometry, radii: Sequence[int], block_m: int = 128,
                    block_n: int = 64) -> tuple[int, int, int]:
    """(visited, full, all) (q-tile, k-tile) pairs of the cell window of the cube order's cubes (cells
    of 1 x CUBE_EDGE x CUBE_EDGE tokens) with cell `radii`, tiles cut from the cube order of the grid."""
    F, H, W = geom.frames, geom.height, geom.width
    g = cube_order_map(F, H, W).numpy()  # the logical grid index of each physical position
    cells = np.stack([g // (H * W), g // W % H // CUBE_EDGE, g % W // CUBE_EDGE], 1)

    def tile_cells(block: int) -> np.ndarray:  # [tiles, 4, 3]: each tile's distinct cells, padded with its first
        starts = range(0, len(g), block)
        out = np.empty((len(starts), 4, 3), dtype=np.int64)
        for i, a in enumerate(starts):
            distinct = np.unique(cells[a:a + block], axis=0)
            out[i] = distinct[np.minimum(np.arange(4), len(distinct) - 1)]
            if len(distinct) > 4:
                raise ValueError(f"a {block}-token tile spans {len(distinct)} cubes")
        return out

    q, k, r = tile_cells(block_m), tile_cells(block_n), np.asarray(radii)
    visited = full = 0
    for qt in q:
        near = (np.abs(qt[:, None, None, :] - k[None]) <= r).all(-1)  # [q cells, k-tiles, k cells]
        visited += int(near.any((0, 2)).sum())
        full += int(near.all((0, 2)).sum())
    return visited, full, len(q) * len(k)


def padded_cell_tiles(geom: VideoGeometry, cell: Sequence[int], radii: Sequence[int], block_m: int = 128,
                      block_n: int = 64) -> tuple[int, int]:
    """(visited, all) (q-tile, k-tile) pairs of a cell window whose cells are each padded to whole
    q-tiles and k-tiles, tiles of pads alone skipped (`all`: the tiles of the unpadded grid, what dense
    attention visits)."""
    slots = math.prod(cell)
    if slots % block_m or slots % block_n:
        raise ValueError(f"a {slots}-token cell is not a whole number of {block_m}- and {block_n}-row tiles")
    axes = []  # per axis: each cell's coordinate and its real extent (ragged last cell)
    for n, size in zip((geom.frames, geom.height, geom.width), cell):
        i = np.arange(-(-n // size))
        axes.append((i, np.minimum(size, n - i * size)))
    grids = [np.meshgrid(*(a[k] for a in axes), indexing="ij") for k in (0, 1)]
    coord = np.stack([c.ravel() for c in grids[0]], 1)  # [cells, 3]
    real = np.prod(np.stack([e.ravel() for e in grids[1]], 1), 1)
    q_tiles, k_tiles = -(-real // block_m), -(-real // block_n)  # tiles holding real tokens
    near = (np.abs(coord[:, None, :] - coord[None, :, :]) <= np.asarray(radii)).all(-1)
    N = geom.grid_tokens
    return int(q_tiles @ near @ k_tiles), -(-N // block_m) * -(-N // block_n)


PADDED_CELL = (1, 8, 16)  # 128 tokens: one q-tile, two k-tiles
TILE_SHAPES = (("Wan2.1-1.3B 480p", VideoGeometry(21, 30, 52)), ("Wan2.1-14B 720p", VideoGeometry(21, 45, 80)),
               ("CogVideoX1.5 768p (grid)", VideoGeometry(11, 48, 85)))


def tiles_markdown(shapes=TILE_SHAPES, targets: Sequence[float] = (0.1, 0.3)) -> str:
    """Visited and masked tiles, and the efficiency reachable at the dense rate, of token and cube-cell
    windows at each target density (128 x 64 tiles)."""
    lines = ["| grid | target | window | radii | token density | visited tiles | masked share | "
             "efficiency at most |", "|---|---|---|---|---|---|---|---|"]
    for name, geom in shapes:
        for target in targets:
            token = pattern_for_density("local_window", target, geom)
            tables = compile_layer((token,), geom, 128, 64).tables
            row_ptr, base = tables.row_ptr.numpy(), int(tables.head_rules[0, 1])
            runs = tables.runs.numpy()[row_ptr[base]:row_ptr[base + tables.num_q_tiles]]
            every = tables.num_q_tiles * tables.num_k_tiles
            cell = match_density(geom, (1, CUBE_EDGE, CUBE_EDGE), target)
            visited, full, cell_every = cube_cell_tiles(geom, cell.radii)
            wide = match_density(geom, PADDED_CELL, target)
            padded, padded_every = padded_cell_tiles(geom, PADDED_CELL, wide.radii)
            for label, radii, density, v, f, n in (
                    ("token", token.radii(geom), token.density(geom), visited_tiles(runs), full_tiles(runs), every),
                    (f"cell 1x{CUBE_EDGE}x{CUBE_EDGE}", cell.radii, cell.density, visited, full, cell_every),
                    ("cell 1x8x16, padded", wide.radii, wide.density, padded, padded, padded_every)):
                lines.append(f"| {name} | {target:g} | {label} | {tuple(radii)} | {density:.3f} | {v} | "
                             f"{1 - f / v:.2f} | {density * n / v:.2f} |")
    return "\n".join(lines) + "\n"


def step_bucket(step: int, steps: int) -> int:
    """Index into BUCKETS of a sampling step: thirds of the run."""
    return min(step * len(BUCKETS) // steps, len(BUCKETS) - 1)


def _head_name(index: int, heads: int) -> str:
    return f"L{index // heads}h{index % heads}"


def _summary(e: torch.Tensor) -> str:
    return f"{float(e.mean()):.3f}"


def results_markdown(recorder: WindowErrors, plan: Sequence[Comparison], geom: VideoGeometry, *,
                     command: str, settings: str) -> str:
    """The results page: nearest-density windows, cell windows at the token window's exact density,
    and that comparison by step third."""
    index = {w: i for i, w in enumerate(recorder.windows)}
    errors, mass = recorder.head_errors(), recorder.head_mass()
    n, heads = errors.shape[1], recorder.heads

    def at_token_density(c: Comparison, e: torch.Tensor) -> torch.Tensor:
        return interpolate((c.lower.density, e[index[c.lower]]), (c.upper.density, e[index[c.upper]]),
                           c.token.density)

    def versus(cell_e: torch.Tensor, token_e: torch.Tensor) -> str:
        return f"{float((cell_e / token_e).median()):.3f} | {int((cell_e > token_e).sum())}/{n}"

    under = " | ".join(f"≤ {t:g}" for t in THRESHOLDS)
    lines = [
        "# Cell-aligned vs token-centred 3D windows: attention error on the testbed",
        "",
        f"Written by `{command}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. {settings} "
        f"Grid {geom.frames}x{geom.height}x{geom.width} tokens; {recorder.layers} layers x {heads} heads = {n} heads. "
        f"Worst relative L2 gap between the model's dense attention and ours: {recorder.reference_gap:.1e}.",
        "",
        "Error: relative L2 error of the attention output rows vs dense, pooled per head over rows, calls and "
        f"batch. `{under}`: heads (of {n}) with error ≤ t. mass: mean softmax mass inside the window. "
        "vs token: median over heads of error / token-window error; worse: heads with a larger error than the "
        "token window's. Radii are (frame, row, column) in cells (tokens for the token window).",
        "",
        "## Windows nearest to each target density",
        "",
        f"| target | window | radii | density | mean error | worst error (head) | {under} | mass | vs token | worse |",
        "|---|---|---|---|---|---|" + "---|" * len(THRESHOLDS) + "---|---|---|",
    ]
    rows = list(dict.fromkeys((c.target, w, c.token) for c in plan for w in (c.token, c.nearest)))
    for target, w, token in rows:
        e, worst = errors[index[w]], int(errors[index[w]].argmax())
        counts = " | ".join(str(int((e <= th).sum())) for th in THRESHOLDS)
        vs = "— | —" if w == token else versus(e, errors[index[token]])
        lines.append(f"| {target:g} | {w.label} | {w.radii} | {w.density:.3f} | {_summary(e)} | "
                     f"{float(e.max()):.3f} ({_head_name(worst, heads)}) | {counts} | "
                     f"{float(mass[index[w]].mean()):.3f} | {vs} |")
    lines += [
        "",
        "## Cell windows at the token window's exact density",
        "",
        "Each head's cell-window error interpolated linearly in density between the two cell windows of the "
        "target's frame reach whose densities bracket the token window's (same window twice: exact).",
        "",
        f"| target | token density | cell | bracket: radii @ density | token mean error | cell mean error | "
        f"token / cell heads {under} | vs token | worse |",
        "|---|---|---|---|---|---|" + "---|" * len(THRESHOLDS) + "---|---|",
    ]
    for c in plan:
        t_e, c_e = errors[index[c.token]], at_token_density(c, errors)
        counts = " | ".join(f"{int((t_e <= th).sum())} / {int((c_e <= th).sum())}" for th in THRESHOLDS)
        lines.append(f"| {c.target:g} | {c.token.density:.3f} | {c.nearest.label} | {c.lower.radii} @ "
                     f"{c.lower.density:.3f}, {c.upper.radii} @ {c.upper.density:.3f} | {_summary(t_e)} | "
                     f"{_summary(c_e)} | {counts} | {versus(c_e, t_e)} |")
    spans = [[s for s in range(recorder.steps) if step_bucket(s, recorder.steps) == b] for b in range(len(BUCKETS))]
    used = [b for b, s in enumerate(spans) if s]
    by_bucket = {b: recorder.head_errors(b) for b in used}
    lines += ["", "## The same comparison by sampling step (step 0 = noisiest): token / cell mean error", "",
              "| target | cell | " + " | ".join(f"{BUCKETS[b]} (steps {spans[b][0]}-{spans[b][-1]})" for b in used)
              + " |", "|---|---|" + "---|" * len(used)]
    for c in plan:
        cells = " | ".join(f"{_summary(by_bucket[b][index[c.token]])} / {_summary(at_token_density(c, by_bucket[b]))}"
                           for b in used)
        lines.append(f"| {c.target:g} | {c.nearest.label} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Attention error of cell-aligned vs token 3D windows on the testbed.")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    parser.add_argument("--prompts", type=int, default=PROMPTS, help="first N held-out prompts (seed 0)")
    parser.add_argument("--steps", type=int, default=SAMPLE_STEPS)
    parser.add_argument("--stride", type=int, default=7, help="every stride-th query row is measured")
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--tiles", action="store_true", help="count the kernel's tiles of each window at the "
                        "real models' grid sizes instead (no model)")
    args = parser.parse_args(argv)
    if args.tiles:
        text = tiles_markdown()
        print(text)
        if args.out:
            args.out.write_text(text)
        return
    if not 1 <= args.prompts <= len(HELD_OUT):
        parser.error(f"--prompts must be in 1..{len(HELD_OUT)}")
    started = time.perf_counter()
    model = load_testbed(args.weights, "cpu")
    cfg = model.config
    geom = testbed_geometry(dict(cfg))
    plan = comparisons(geom)
    recorder = WindowErrors(measured_windows(plan), cfg.num_layers, cfg.num_attention_heads, args.steps, args.stride)
    prompts = [p.text for p in HELD_OUT[: args.prompts]]
    generate(model, prompts, [0] * len(prompts), steps=args.steps, controller=recorder)
    seconds = time.perf_counter() - started
    command = "python3 -m sparse_vdit.bench.cell_window_error" + "".join(
        f" --{name} {value}" for name, value, default in
        (("prompts", args.prompts, PROMPTS), ("steps", args.steps, SAMPLE_STEPS), ("stride", args.stride, 7))
        if value != default)
    settings = (f"CPU ({torch.get_num_threads()} threads), {seconds:.0f} s. {len(prompts)} held-out prompts x seed 0, "
                f"{args.steps} UniPC steps with CFG (both branches measured), every {args.stride}th query row.")
    text = results_markdown(recorder, plan, geom, command=command, settings=settings)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
