"""The plan compiler: one layer's per-head patterns at one geometry -> KernelTables (DESIGN.md 4, 6).

Tiles are classified without an L x L mask. A q-tile (up to block_m consecutive physical rows,
restarting where the grid starts and ends unless segment_q_tiles=False: tables.q_tile_bounds) is cut
into segments: in frame-major order at frames (and rows when a window is on), in space-major
order at spatial positions (unless the band covers every frame). For each segment every component
of the head rule gives the key intervals, in physical order, that some query attends ("any") and
that all its queries attend ("all"); in frame-major order stripes are such intervals too. A k-tile
is visited when some segment's any-interval touches it (exact); it is full when it lies inside the
merged all-intervals of every grid segment of the q-tile (conservative: a full tile marked partial
is still exact, only slower). Keys every query attends that no interval holds (non-grid keys;
stripes in space-major order) give each k-tile a code (from per-key booleans when stripes are
on). Tile ranges are combined by one sorted sweep over their end points, so the cost grows with
the number of intervals, never with L x L or tiles x tiles.

Cube order (ORDER 2, windows) is classified from tile boxes instead: each tile's grid tokens span a
box of frames, rows and columns, and a window attends some pair of a q-tile and a k-tile when the
per-axis box distance is within its radii (exact for box-shaped tiles, a superset for tiles
straddling cubes) and every pair when the per-axis largest distance is (conservative). A pair's
code (0 not visited, 1 partial, 2 full) is the largest of the window's, its k-tile's key-only code
and its q-tile's non-grid-row code. Frames ascend in cube order, so the frame test cuts each q-tile's
k-tiles into a few ranges; the row and column tests depend only on the tiles' box classes, so each
range is read from the runs of a code row shared by the q-tiles of one class (_cube_tile_runs). A
window gets the cheaper (tile_cost) of frame-major and cube order; frame-major is compiled only
when a lower bound of its cost from token counts does not already exceed the cube-order cost.

Each distinct rule is classified once per (geometry, tiles, device) and its range-encoded runs are
appended to one append-only pool shared by every head, layer and bucket; head rules carry
ROW_BASE into it.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..kernels import rule as R
from ..kernels import sparse_attention
from ..kernels.tables import KernelTables, q_tile_bounds
from .geometry import VideoGeometry
from .patterns import Dense, Pattern


def _cdiv(a, b):
    return -(-a // b)


# A partial (masked) tile costs about this many full tiles (H200, bench/results/attention.md).
PARTIAL_TILE_COST = 3.8

# Threads classifying a layer's new rules at once.
# One: a rule's classification is many short numpy calls, and threads hand the GIL over at each, so
# two threads compiled a searched 720p layer slower than one on 2 cores (BENCHMARKS.md, plan compiler).
_CLASSIFY_THREADS = 1


class _Intervals:
    """Collects half-open key intervals [start, end) per segment (physical positions)."""

    def __init__(self, seg, start, end):
        self.seg, self.start, self.end = [seg], [start], [end]

    def add(self, seg, start, end):
        seg, start, end = np.broadcast_arrays(seg, start, end)
        keep = end > start
        self.seg.append(seg[keep].ravel())
        self.start.append(start[keep].ravel())
        self.end.append(end[keep].ravel())

    def arrays(self):
        return tuple(np.concatenate(a).astype(np.int64, copy=False) for a in (self.seg, self.start, self.end))


def _tile_bounds(geom: VideoGeometry, block: int, segment: bool) -> np.ndarray:
    """First physical position of each tile of `block` positions, then L (tables.q_tile_bounds:
    with `segment` the tiles restart where the grid starts and ends; k-tiles never do)."""
    return q_tile_bounds(geom.prefix, geom.grid_tokens, geom.seq_len, block, segment)


@functools.lru_cache(maxsize=32)
def _segments(geom: VideoGeometry, block_m: int, segment: bool, inner: int):
    """Grid segments [a0, a1) of physical grid positions, cut at q-tiles and at multiples of
    `inner`; returns a0, a1, each segment's q-tile and the (segment, start, end) intervals of every
    rule: any (each query attends itself) and all (itself when alone)."""
    N, pre = geom.grid_tokens, geom.prefix
    bounds = _tile_bounds(geom, block_m, segment)
    cuts = np.concatenate([np.arange(0, N + 1, inner), np.clip(bounds - pre, 0, N)])
    cuts.sort(kind="stable")  # two sorted runs: merged
    cuts = cuts[np.append(True, cuts[1:] != cuts[:-1])]
    a0, a1 = cuts[:-1], cuts[1:]
    seg = np.arange(a0.size)
    alone = a1 - a0 == 1
    out = (a0, a1, np.searchsorted(bounds, a0 + pre, "right") - 1, (seg, a0, a1), (seg[alone], a0[alone], a1[alone]))
    for a in out[:3] + out[3] + out[4]:
        a.flags.writeable = False  # cached: shared by every caller
    return out


def _strided(iv: _Intervals, for_all: bool, block_n: int, seg, first, j_lo, j_hi, lo, hi, stride):
    """Add the intervals `first + j*stride + [lo, hi)`, j = j_lo..j_hi, of each segment (broadcast).

    Any-intervals whose gaps (stride - (hi - lo)) are narrower than a k-tile touch one contiguous
    range of k-tiles, so one spanning interval stands for them (tile-exact). All-intervals covering
    whole strides join into one; separate pieces are kept only when long enough to hold a k-tile
    at any alignment (2 * block_n - 1), others are left out (conservative: their tiles stay partial).
    """
    seg, first, j_lo, j_hi, lo, hi = (a.ravel() for a in np.broadcast_arrays(seg, first, j_lo, j_hi, lo, hi))
    ok = (j_hi >= j_lo) & (hi > lo)
    one = ok & ((hi - lo >= stride) if for_all else (stride - (hi - lo) < block_n))
    iv.add(seg[one], first[one] + j_lo[one] * stride + lo[one], first[one] + j_hi[one] * stride + hi[one])
    many = ok & ~one & ((hi - lo >= 2 * block_n - 1) if for_all else True)
    if many.any():
        j = j_lo[many, None] + np.arange(int((j_hi - j_lo)[many].max()) + 1)[None, :]
        base = first[many, None] + j * stride
        valid = j <= j_hi[many, None]
        iv.add(seg[many, None], np.where(valid, base + lo[many, None], 0),
               np.where(valid, base + hi[many, None], 0))


def _frame_major_intervals(rule, geom, a0, a1, any_iv: _Intervals, all_iv: _Intervals, block_n: int):
    """Any/all grid intervals of the diagonal, multi-diagonal and window parts, frame-major order.
    Segments lie in one frame (and in one row when a window is on)."""
    F, H, W, P, N = geom.frames, geom.height, geom.width, geom.tokens_per_frame, geom.grid_tokens
    seg = np.arange(a0.size)
    g0, g1 = a0, a1 - 1
    f, s0, s1 = a0 // P, a0 % P, g1 % P
    if rule[R.DIAG] >= 0:
        D = rule[R.DIAG]
        any_iv.add(seg, np.maximum(0, g0 - D), np.minimum(N, g1 + D + 1))
        all_iv.add(seg, np.maximum(0, g1 - D), np.minimum(N, g0 + D + 1))
    if rule[R.MD_S] >= 0:
        S, T = rule[R.MD_S], rule[R.MD_T]
        frames = (np.maximum(0, f - T), np.minimum(F - 1, f + T))
        for iv, for_all, lo, hi in ((any_iv, False, s0 - S, s1 + S + 1), (all_iv, True, s1 - S, s0 + S + 1)):
            _strided(iv, for_all, block_n, seg, 0, *frames, np.maximum(0, lo), np.minimum(P, hi), P)
    if rule[R.WIN_F] >= 0:
        WF, WY, WX = min(rule[R.WIN_F], F - 1), rule[R.WIN_Y], rule[R.WIN_X]
        y, x0, x1 = s0 // W, s0 % W, s1 % W
        kf = f[:, None] + np.arange(-WF, WF + 1)[None, :]
        y_lo = np.where((kf >= 0) & (kf < F), np.maximum(0, y - WY)[:, None], H)  # empty when off-grid
        y_hi = np.minimum(H - 1, y + WY)[:, None]
        for iv, for_all, lo, hi in ((any_iv, False, x0 - WX, x1 + WX + 1), (all_iv, True, x1 - WX, x0 + WX + 1)):
            _strided(iv, for_all, block_n, seg[:, None], kf * P, y_lo, y_hi,
                     np.maximum(0, lo)[:, None], np.minimum(W, hi)[:, None], W)


def _space_major_intervals(rule, geom, a0, a1, any_iv: _Intervals, all_iv: _Intervals, block_n: int):
    """Any/all grid intervals of the multi-diagonal part in space-major order (p = s*F + f);
    segments lie in one spatial position s, or span positions s0..s1 when the band covers every frame."""
    F, P = geom.frames, geom.tokens_per_frame
    seg = np.arange(a0.size)
    s0, s1, f0, f1 = a0 // F, (a1 - 1) // F, a0 % F, (a1 - 1) % F
    S, T = rule[R.MD_S], rule[R.MD_T]
    for iv, for_all, keys, lo, hi in ((any_iv, False, (s0 - S, s1 + S), f0 - T, f1 + T + 1),
                                      (all_iv, True, (s1 - S, s0 + S), f1 - T, f0 + T + 1)):
        _strided(iv, for_all, block_n, seg, 0, np.maximum(0, keys[0]), np.minimum(P - 1, keys[1]),
                 np.maximum(0, lo), np.minimum(F, hi), F)


def _merge_per_group(group, start, end):
    """Merge each group's intervals (starts >= 0) into disjoint ones, sorted (returns group, start, end)."""
    if group.size == 0:
        return group, start, end
    span = int(end.max()) + 1
    idx = np.argsort(group * span + start, kind="stable")  # inputs are runs of sorted intervals
    group, start, end = group[idx], start[idx], end[idx]
    reach = np.maximum.accumulate(group * span + end) - group * span  # running end within a group
    new = np.ones(group.size, dtype=bool)
    new[1:] = (group[1:] != group[:-1]) | (start[1:] > reach[:-1])
    first = np.nonzero(new)[0]
    last = np.append(first[1:], group.size) - 1
    return group[first], start[first], reach[last]


_CHANNEL = 1 << 31  # the sweep's second count rides in the high bits of one int64 sum


def _sweep(qt, lo, hi, kind, weights, nk):
    """Cover counts of tile ranges [lo, hi) per q-tile: a range of `kind` k adds weights[k] (first
    count + _CHANNEL * second count) over its positions. Pieces (qt, start, end, first count, second
    count) of constant counts, sorted and non-empty, covering every position between a q-tile's first
    and last event."""
    bits = int(nk).bit_length()  # positions 0..nk
    start = ((qt.astype(np.int64) << bits) + lo) * 8 + 2 * kind  # event: (q, pos, kind, is end)
    events = np.concatenate([start, start + (hi - lo) * 8 + 1])
    events.sort(kind="stable")  # timsort: sorted runs merge fast (equal events may come in any order)
    counts = np.cumsum(np.stack([weights, -weights], 1).ravel()[events & 7])
    q, pos = events >> (bits + 3), events >> 3 & ((1 << bits) - 1)
    i = np.nonzero((q[1:] == q[:-1]) & (pos[1:] > pos[:-1]))[0]
    return q[i], pos[i], pos[i + 1], counts[i] & (_CHANNEL - 1), counts[i] >> 31


def _ranges(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of the runs of True in a 1-D bool array."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]


def _key_code(rule, order, geom: VideoGeometry, block_n: int) -> np.ndarray:
    """Per k-tile (int8): 2 when made only of keys every query attends (non-grid, stripe; keys past L
    count as such), 1 when holding such a key, else 0."""
    return _stripe_key_code(tuple(rule[R.STRIPE_FIRST:]), order, geom, block_n)


@functools.lru_cache(maxsize=256)
def _stripe_key_code(stripes: tuple, order, geom: VideoGeometry, block_n: int) -> np.ndarray:
    """_key_code of rules whose stripe part rule[STRIPE_FIRST:] is `stripes` (() for none)."""
    if not stripes or (stripes[0] <= 0 and stripes[1] <= 0):  # non-grid keys only: coded as rows are
        return _row_code(geom, block_n)
    L, N, F, P, pre = geom.seq_len, geom.grid_tokens, geom.frames, geom.tokens_per_frame, geom.prefix
    nk = _cdiv(L, block_n)
    first, n_cols, cols = stripes[0], stripes[1], stripes[2:]
    grid = np.zeros(N, dtype=bool)  # stripes: grid intervals in frame-major order
    grid[: max(first, 0)] = True
    for c in range(min(n_cols, R.MAX_COLS)):
        grid[cols[2 * c]: cols[2 * c + 1]] = True
    if order == R.SPACE_MAJOR:
        grid = grid.reshape(F, P).T.ravel()
    elif order == R.CUBE:
        grid = grid[_cube_map(geom)]
    keys = np.ones(nk * block_n, dtype=bool)
    keys[pre: pre + N] = grid
    attended = np.add.reduceat(keys.view(np.uint8), np.arange(0, keys.size, block_n), dtype=np.int64)
    some = attended > 0
    some[-1] = keys[(nk - 1) * block_n: L].any()  # real keys only
    code = some.astype(np.int8) + (attended == block_n)
    code.flags.writeable = False  # cached: shared by every caller
    return code


@functools.lru_cache(maxsize=256)
def _code_ranges(stripes: tuple, order, geom: VideoGeometry, block_m: int, segment: bool, block_n: int):
    """(q-tile, lo, hi, kind) k-tile ranges of the key codes (_stripe_key_code) and the row codes:
    kind 0 where either is > 0 (visited), kind 2 where either is 2 (full)."""
    key, row = _stripe_key_code(stripes, order, geom, block_n), _row_code(geom, block_m, segment)
    nq, q, lo, hi, kind = row.size, [], [], [], []
    for k, code in ((0, 1), (2, 2)):
        start, end = _ranges(key >= code)  # for every q-tile
        rows = np.flatnonzero(row >= code)  # every k-tile
        q += [np.repeat(np.arange(nq), start.size), rows]
        lo += [np.tile(start, nq), np.zeros_like(rows)]
        hi += [np.tile(end, nq), np.full_like(rows, key.size)]
        kind.append(np.full(nq * start.size + rows.size, k))
    out = tuple(np.concatenate(a) for a in (q, lo, hi, kind))
    for a in out:
        a.flags.writeable = False  # cached: shared by every caller
    return out


@functools.lru_cache(maxsize=64)
def _row_code(geom: VideoGeometry, block: int, segment: bool = False) -> np.ndarray:
    """Per tile of `_tile_bounds(geom, block, segment)` (int8): 2 without grid positions (a q-tile's
    every k-tile is full; a k-tile every query attends), 1 holding a non-grid position, else 0."""
    N, pre = geom.grid_tokens, geom.prefix
    bounds = _tile_bounds(geom, block, segment)
    lo, hi = bounds[:-1], bounds[1:]
    code = ((lo < pre) | (hi > pre + N)).astype(np.int8) + ((hi <= pre) | (lo >= pre + N))
    code.flags.writeable = False  # cached: shared by every caller
    return code


def tile_runs(rule, order: int, geom: VideoGeometry, block_m: int, block_n: int, segment_q_tiles: bool = True):
    """Range-encoded k-tiles of one head rule in physical `order`: (row_ptr [q-tiles + 1] int64,
    runs [R, 3] int32 = (k_tile_start, k_tile_end, full)), runs sorted within each q-tile; q-tiles
    as `tables.q_tile_bounds`."""
    segment = segment_q_tiles
    if order == R.SPACE_MAJOR and (rule[R.DIAG] >= 0 or rule[R.WIN_F] >= 0):
        raise ValueError("space-major order supports multi-diagonal and stripe rules only, "
                         f"not a diagonal or window (rule {rule})")
    if order == R.CUBE:
        return _cube_tile_runs(rule, geom, block_m, segment, block_n)
    if order == R.SPACE_MAJOR:  # a band over every frame joins the positions of a q-tile
        inner = geom.grid_tokens if rule[R.MD_T] >= geom.frames - 1 else geom.frames
    else:  # windows need one row per segment; bands only one frame
        inner = geom.width if rule[R.WIN_F] >= 0 else geom.tokens_per_frame
    a0, a1, seg_qt, any_base, all_base = _segments(geom, block_m, segment, inner)
    holds_itself = (rule[R.DIAG] >= 0 or (rule[R.MD_S] >= 0 and rule[R.MD_T] >= 0)
                    or (rule[R.WIN_F] >= 0 and rule[R.WIN_Y] >= 0 and rule[R.WIN_X] >= 0))
    any_iv = _Intervals(*(a[:0] for a in any_base) if holds_itself else any_base)  # a query attends itself
    all_iv = _Intervals(*all_base)
    if order == R.FRAME_MAJOR:  # stripes are intervals every query attends; key codes: non-grid keys only
        for start, end in [(0, rule[R.STRIPE_FIRST])] + [(rule[R.COLS + 2 * c], rule[R.COLS + 2 * c + 1])
                                                         for c in range(max(rule[R.N_COLS], 0))]:
            start, end = max(start, 0), min(end, geom.grid_tokens)
            if end > start:
                any_iv.add(any_base[0], start, end)
                all_iv.add(any_base[0], start, end)
        _frame_major_intervals(rule, geom, a0, a1, any_iv, all_iv, block_n)
        stripes = ()
    else:  # stripes scatter: key codes
        stripes = tuple(rule[R.STRIPE_FIRST:])
        if rule[R.MD_S] >= 0:
            _space_major_intervals(rule, geom, a0, a1, any_iv, all_iv, block_n)
    codes = _code_ranges(stripes, order, geom, block_m, segment, block_n)
    return _interval_tables(any_iv, all_iv, seg_qt, codes, geom, len(_tile_bounds(geom, block_m, segment)) - 1,
                            block_n)


def _interval_tables(any_iv: _Intervals, all_iv: _Intervals, seg_qt, codes, geom: VideoGeometry, nq: int,
                     block_n: int):
    """(row_ptr, runs) of grid intervals and the codes' k-tile ranges (_code_ranges): a k-tile is
    visited when an any-interval touches it or a code range of kind 0 holds it; full when it lies
    inside the merged all-intervals of every grid segment of its q-tile, or a range of kind 2 holds it."""
    L, pre = geom.seq_len, geom.prefix
    nk = _cdiv(L, block_n)
    segments = np.bincount(seg_qt, minlength=nq)
    s, lo, hi = any_iv.arrays()
    visits = seg_qt[s], (lo + pre) // block_n, (hi + pre - 1) // block_n + 1
    s, lo, hi = _merge_per_group(*all_iv.arrays())  # every query attends the non-grid keys: joined at 0, N
    lo = np.where(lo > 0, _cdiv(lo + pre, block_n), 0)
    hi = np.where(hi < geom.grid_tokens, (hi + pre) // block_n, nk)  # keys past L count as attended
    covers = seg_qt[s[hi > lo]], lo[hi > lo], hi[hi > lo]
    q, lo, hi = (np.concatenate([visits[i], covers[i], codes[i]]) for i in range(3))
    kind = np.concatenate([np.zeros(visits[0].size, np.int64), np.ones(covers[0].size, np.int64), codes[3]])
    weights = np.array([1, _CHANNEL, (segments.max() + 1) * _CHANNEL])  # visits, covers once, covers all
    q, start, end, n_visits, n_covers = _sweep(q, lo, hi, kind, weights, nk)
    code = (n_visits > 0) * (1 + (n_covers >= segments[q]))  # 0 not visited, 1 partial, 2 full
    keep = code > 0
    return _runs(q[keep], start[keep], end[keep], code[keep], nq)


def _cube_map(geom: VideoGeometry) -> np.ndarray:
    """Cube order's physical grid position -> logical grid index (rule.cube_order_map)."""
    return R.cube_order_map(geom.frames, geom.height, geom.width).numpy()


@functools.lru_cache(maxsize=32)
def _cube_classes(geom: VideoGeometry, block: int, segment: bool):
    """Cube order, tiles of `_tile_bounds(geom, block, segment)`: (first grid-bearing tile, frame lo, frame hi of each
    grid-bearing tile, class of every tile, ((row class of each class, row boxes [row classes, 2]), the
    same for columns)). A tile's box is the per-axis min / max over its grid tokens; tiles of equal
    row and column boxes share a class; tiles without grid tokens get class `classes` (one past the last)."""
    N, pre, P, H, W = geom.grid_tokens, geom.prefix, geom.tokens_per_frame, geom.height, geom.width
    tiles = _tile_bounds(geom, block, segment)
    first, last = (int(t) for t in np.searchsorted(tiles, [pre, pre + N - 1], "right") - 1)
    starts = np.maximum(tiles[first:last + 1] - pre, 0)
    ends = np.append(starts[1:], N)
    frame = R.cube_order_map(1, H, W).numpy()  # every frame is laid out as the first
    coord = np.tile(np.stack([frame // W, frame % W], 1), (_cdiv(block, P) + 1, 1))  # (row, column)
    local = starts % P  # each tile's positions, from its first frame on
    bounds = np.stack([local, local + ends - starts], 1).ravel()
    lo, hi = np.minimum.reduceat(coord, bounds)[::2], np.maximum.reduceat(coord, bounds)[::2]
    axis_boxes, axis_class = [], []
    for axis, size in enumerate((H, W)):
        packed, tile_axis_class = np.unique(lo[:, axis] * size + hi[:, axis], return_inverse=True)
        axis_boxes.append(np.stack([packed // size, packed % size], 1))
        axis_class.append(tile_axis_class)
    pairs, grid_class = np.unique(axis_class[0] * len(axis_boxes[1]) + axis_class[1], return_inverse=True)
    tile_class = np.full(len(tiles) - 1, pairs.size)
    tile_class[first: last + 1] = grid_class
    axes = ((pairs // len(axis_boxes[1]), axis_boxes[0]), (pairs % len(axis_boxes[1]), axis_boxes[1]))
    out = (first, starts // P, (ends - 1) // P, tile_class, axes)
    for a in out[1:4] + tuple(a for axis in axes for a in axis):
        a.flags.writeable = False  # cached: shared by every caller
    return out


def _code_pieces(code: np.ndarray):
    """(start, end, code) of the runs of one nonzero code in a 1-D int8 array that starts and ends with 0."""
    edge = np.flatnonzero(code[1:] != code[:-1]) + 1  # where a run of one code starts (the last: of 0)
    kind = code[edge[:-1]]
    piece = np.nonzero(kind)[0]
    return edge[piece], edge[piece + 1], kind[piece]


def _axis_code(radius: int, q_box: np.ndarray, k_box: np.ndarray) -> np.ndarray:
    """[q class, k class] int8 along one axis of class boxes [classes, (lo, hi)]: 2 when every pair
    of coordinates is within `radius`, 1 when some pair is, else 0."""
    (q_lo, q_hi), (k_lo, k_hi) = q_box.T[:, :, None], k_box.T[:, None, :]
    some = (k_lo <= q_hi + radius) & (k_hi >= q_lo - radius)
    every = (k_hi <= q_lo + radius) & (k_lo >= q_hi - radius)
    return some.astype(np.int8) + every


def _cube_tile_runs(rule, geom: VideoGeometry, block_m: int, segment: bool, block_n: int):
    """tile_runs for cube order (windows with stripes).

    A pair's window code is the smaller of its frame code (from the tiles' frame spans: k-tiles
    [vs, fs) and [fe, ve) of a q-tile are partial by frames, [fs, fe) full, the rest out of reach) and
    its spatial code (from the classes' boxes, the smaller of the row and column codes). Each q-tile's
    k-tiles are cut at vs, fs, fe, ve into five ranges; each range is read from one code row over all
    k-tiles: max(key, row) (out of reach), max(key, row, min(spatial, 1)) (partial frames) or
    max(key, row, spatial) (full frames), `row` being the q-tile's row code and `spatial` the codes of
    its classes; the rows are built once per distinct (row code, row-axis codes, column-axis codes)
    and range-encoded together. A range's runs are clipped to it; its first run joins the q-tile's
    previous run when they touch with the same code.
    """
    if rule[R.WIN_F] < 0 or rule[R.DIAG] >= 0 or rule[R.MD_S] >= 0:
        raise ValueError("cube order supports window rules (with stripes) only, "
                         f"not a diagonal, a spatial band or no window (rule {rule})")
    key, row = _key_code(rule, R.CUBE, geom, block_n), _row_code(geom, block_m, segment)
    nq, nk = row.size, key.size
    q0, qf_lo, qf_hi, q_class, q_axes = _cube_classes(geom, block_m, segment)
    k0, kf_lo, kf_hi, k_class, k_axes = _cube_classes(geom, block_n, False)
    rf = min(rule[R.WIN_F], geom.frames - 1)
    grid = slice(q0, q0 + qf_lo.size)
    # each grid-bearing q-tile's (row code, row-axis codes, column-axis codes), packed in one int
    combo, axis_codes = row[grid].astype(np.int64), []
    for (q_axis, q_boxes), (k_axis, k_boxes), radius in zip(q_axes, k_axes, (rule[R.WIN_Y], rule[R.WIN_X])):
        table = _axis_code(radius, q_boxes, k_boxes)
        seen: dict[bytes, int] = {}  # classes of equal codes share them
        distinct = np.array([seen.setdefault(r.tobytes(), len(seen)) for r in table])
        combo = combo * len(seen) + distinct[q_axis[q_class[grid]]]
        axis_codes.append((table[np.unique(distinct, return_index=True)[1]][:, k_axis], len(seen)))
    (y_codes, ny), (x_codes, nx) = axis_codes  # [distinct codes, k class]
    combos = np.flatnonzero(np.bincount(combo))
    n, row_codes = combos.size, combos // (ny * nx)
    spatial = np.zeros((n, len(k_axes[0][0]) + 1), np.int8)  # k-tiles without grid keys: 0
    np.minimum(y_codes[combos // nx % ny], x_codes[combos % nx], out=spatial[:, :-1])
    background = np.maximum(key, np.arange(3, dtype=np.int8)[:, None])  # code rows 0, 1, 2: row code c
    width = nk + 1  # a code row and the 0 that ends it
    code = np.zeros((3 + 2 * n) * width + 1, np.int8)  # led by a 0
    rows = code[1:].reshape(-1, width)[:, :nk]
    rows[:3] = background
    full_frames, partial_frames = rows[3: 3 + n], rows[3 + n:]
    np.maximum(spatial[:, k_class], background[row_codes], out=full_frames)
    np.minimum(full_frames, np.maximum(background, 1)[row_codes], out=partial_frames)  # spatial code capped at 1
    start, end, kind = _code_pieces(code)  # runs of the code rows, at flat positions
    cuts = np.zeros((nq, 6), np.int64)
    cuts[:, 5] = nk
    cuts[grid, 1] = vs = k0 + np.searchsorted(kf_hi, qf_lo - rf, "left")
    cuts[grid, 4] = ve = k0 + np.searchsorted(kf_lo, qf_hi + rf, "right")
    cuts[grid, 2] = fs = np.clip(k0 + np.searchsorted(kf_lo, qf_hi - rf, "left"), vs, ve)
    cuts[grid, 3] = np.clip(k0 + np.searchsorted(kf_hi, qf_lo + rf, "right"), fs, ve)
    code_row = np.repeat(row.astype(np.int64)[:, None], 5, axis=1)
    code_row[grid, 1:4] = 3 + np.searchsorted(combos, combo).reshape(-1, 1) + np.array([n, 0, n])
    base = (code_row * width + 1).ravel()  # flat position of each range's k-tile 0
    lo, hi = base + cuts[:, :5].ravel(), base + cuts[:, 1:].ravel()
    first = np.searchsorted(end, lo, "right")  # the first run ending past a range's start
    count = np.where(hi > lo, np.searchsorted(start, hi, "left") - first, 0)
    ranges = np.flatnonzero(count)  # nonempty ranges, 5 per q-tile, in table order
    first, count, base, lo, hi = first[ranges], count[ranges], base[ranges], lo[ranges], hi[ranges]
    head = np.maximum(start[first], lo) - base
    head_end = np.minimum(end[first], hi) - base
    tail = np.minimum(end[first + count - 1], hi) - base
    joins = np.zeros(ranges.size, bool)
    joins[1:] = ((ranges[1:] // 5 == ranges[:-1] // 5) & (head[1:] == tail[:-1])
                 & (kind[first[1:]] == kind[first[:-1] + count[:-1] - 1]))
    kept = count - joins
    at = np.cumsum(kept) - kept  # where each range's first kept run lands
    local = (start - 1) % width
    table = np.empty((local.size, 3), np.int32)
    table[:, 0], table[:, 1], table[:, 2] = local, local + end - start, kind - 1
    index = np.repeat((first + joins - at).astype(np.int32), kept) + np.arange(int(kept.sum()), dtype=np.int32)
    runs = np.take(table, index, axis=0)
    some = kept > 0
    runs[at[some & ~joins], 0] = head[some & ~joins]
    runs[at[some] + kept[some] - 1, 1] = tail[some]
    # a joined run extends the run before it, unless the next range joins the same one
    extend = joins.copy()
    extend[:-1] &= ~((kept[:-1] == 0) & joins[1:])
    runs[at[extend] - 1, 1] = head_end[extend]
    per_range = np.zeros(5 * nq, np.int64)
    per_range[ranges] = kept
    row_ptr = np.zeros(nq + 1, np.int64)
    np.cumsum(per_range.reshape(-1, 5).sum(axis=1), out=row_ptr[1:])
    return row_ptr, runs


def _box_size(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Positions in boxes [lo, hi] (inclusive; axes along the first dimension)."""
    return np.prod(np.maximum(hi - lo + 1, 0), axis=0)


@functools.lru_cache(maxsize=32)
def _frame_major_queries(geom: VideoGeometry, block_m: int, segment: bool):
    """Frame-major order, the q-tiles with grid rows: (their indices, first frame, (frame, row, column)
    lo and hi [3, q-tiles] over their grid queries, and the (row, column) lo and hi [2, 3, q-tiles] of
    three boxes of their first frame's queries: the first row, the full rows after it and the last
    row; empty boxes have hi -1)."""
    F, H, W, P, N, pre = geom.frames, geom.height, geom.width, geom.tokens_per_frame, geom.grid_tokens, geom.prefix
    grid = np.flatnonzero(_row_code(geom, block_m, segment) < 2)
    bounds = _tile_bounds(geom, block_m, segment)
    g0 = np.clip(bounds[grid] - pre, 0, N)
    g1 = np.clip(bounds[grid + 1] - pre, 0, N) - 1  # the last grid query
    f0, f1 = g0 // P, g1 // P
    one_frame, one_row = f0 == f1, g0 // W == g1 // W
    lo = np.stack([f0, np.where(one_frame, g0 % P // W, 0), np.where(one_row, g0 % W, 0)])
    hi = np.stack([f1, np.where(one_frame, g1 % P // W, H - 1), np.where(one_row, g1 % W, W - 1)])
    s0, s1 = g0 % P, np.where(one_frame, g1 % P, P - 1)
    y0, y1 = s0 // W, s1 // W
    y_lo, y_hi = np.stack([y0, y0 + 1, np.where(y1 > y0, y1, H)]), np.stack([y0, y1 - 1, y1])
    x_lo = np.stack(np.broadcast_arrays(s0 % W, 0, 0))
    x_hi = np.stack(np.broadcast_arrays(np.where(y1 > y0, W - 1, s1 % W), W - 1, s1 % W))
    out = (grid, f0, lo, hi, np.stack([y_lo, x_lo]), np.where(y_hi >= y_lo, np.stack([y_hi, x_hi]), -1))
    for a in out:
        a.flags.writeable = False  # cached: shared by every caller
    return out


def _frame_major_window_bound(rule, geom: VideoGeometry, block_m: int, block_n: int, segment: bool = True) -> float:
    """A lower bound of tile_cost of a window rule's frame-major tables (less one tile for rounding),
    from token counts per q-tile; a q-tile with grid rows costs at least
    visited + (PARTIAL_TILE_COST - 1) * (visited - full) for any visited >= V and full <= min(visited, U):

    V: every attended key lies in a visited k-tile, so visited >= ceil(keys / block_n); the keys
    counted are the non-grid ones and the windows of the q-tile's first-frame queries, whose first
    row, full rows and last row are boxes of queries whose windows are boxes (inclusion-exclusion).
    U: a full k-tile holds a position off the grid or a key of key code > 0 (`odd_tiles`), or only
    grid keys every grid query attends: those lie in the intersection of the windows, a box, whose
    row pieces (one interval per frame when the rows are whole, one in all when the frames are too)
    hold at most floor(length / block_n) k-tiles each.
    """
    F, H, W, P, N, L, pre = (geom.frames, geom.height, geom.width, geom.tokens_per_frame, geom.grid_tokens,
                             geom.seq_len, geom.prefix)
    radius = np.array([[min(rule[R.WIN_F], F - 1)], [rule[R.WIN_Y]], [rule[R.WIN_X]]])
    top = np.array([[F - 1], [H - 1], [W - 1]])
    grid, f0, lo, hi, piece_lo, piece_hi = _frame_major_queries(geom, block_m, segment)
    key = _key_code(rule, R.FRAME_MAJOR, geom, block_n)
    nk, nq = key.size, len(_tile_bounds(geom, block_m, segment)) - 1
    starts = np.arange(nk) * block_n
    odd_tiles = np.count_nonzero(key | (starts < pre) | (starts + block_n > pre + N))
    nf, ny, nx = np.maximum(np.minimum(lo + radius, top) - np.maximum(hi - radius, 0) + 1, 0)  # every query's
    inside = np.where(nx < W, nf * ny * (nx // block_n), np.where(ny < H, nf * (ny * W // block_n), nf * P // block_n))
    lo = np.maximum(piece_lo - radius[1:, :, None], 0)  # the windows of the three boxes
    hi = np.where(piece_hi >= 0, np.minimum(piece_hi + radius[1:, :, None], top[1:, :, None]), -1)
    a, b = [0, 0, 1], [1, 2, 2]  # inclusion-exclusion
    union = (_box_size(lo, hi).sum(axis=0) - _box_size(np.maximum(lo[:, a], lo[:, b]),
                                                        np.minimum(hi[:, a], hi[:, b])).sum(axis=0)
             + _box_size(lo.max(axis=1), hi.min(axis=1)))
    frames = np.minimum(f0 + radius[0], F - 1) - np.maximum(f0 - radius[0], 0) + 1
    visited = np.where(_row_code(geom, block_m, segment)[grid] == 0, np.minimum(_cdiv(frames * union + L - N, block_n), nk), nk)
    full = np.minimum(visited, inside + odd_tiles)
    every = nk * (nq - grid.size)  # q-tiles without grid rows: every k-tile full
    return _cost(int(visited.sum()) + every, int(full.sum()) + every) - 1


def _runs(q, start, end, code, nq: int):
    """(row_ptr, runs) from disjoint pieces of one code (1 partial, 2 full) sorted by q-tile and start:
    touching pieces of equal code join into one run."""
    new = np.ones(q.size, dtype=bool)
    new[1:] = (q[1:] != q[:-1]) | (code[1:] != code[:-1]) | (start[1:] != end[:-1])
    first = np.nonzero(new)[0]
    last = np.append(first[1:], q.size) - 1
    runs = np.empty((first.size, 3), np.int32)
    runs[:, 0], runs[:, 1], runs[:, 2] = start[first], end[last], code[first] - 1
    row_ptr = np.zeros(nq + 1, np.int64)
    np.cumsum(np.bincount(q[first], minlength=nq), out=row_ptr[1:])
    return row_ptr, runs


def _choose_order(rule, geom: VideoGeometry, block_m: int, block_n: int, segment_q_tiles: bool = True):
    """Order and runs of a rule: the cheaper (`tile_cost`) of frame-major and cube order for a window
    without diagonal or spatial band (frame-major is compiled only when its lower bound does not
    exceed the cube-order cost); for a spatial band without diagonal, window or stripe keys (those
    scatter in space-major order) the cheaper of frame-major and space-major, whose costs are first
    estimated per q-tile (both orders are compiled only when the estimates are close); frame-major
    otherwise. Returns (order, row_ptr, runs, visited tiles, tile_cost)."""
    tiles = (block_m, block_n, segment_q_tiles)
    if rule[R.WIN_F] >= 0 and rule[R.DIAG] < 0 and rule[R.MD_S] < 0:
        cube = _ordered(R.CUBE, rule, geom, *tiles)
        if cube[4] >= _frame_major_window_bound(rule, geom, block_m, block_n, segment_q_tiles):
            fm = _ordered(R.FRAME_MAJOR, rule, geom, *tiles)
            if fm[4] <= cube[4]:
                return fm
        return cube
    if rule[R.MD_S] < 0 or rule[R.DIAG] >= 0 or rule[R.WIN_F] >= 0 or rule[R.STRIPE_FIRST] > 0 \
            or rule[R.N_COLS] > 0:
        return _ordered(R.FRAME_MAJOR, rule, geom, *tiles)
    F, P, S, T = geom.frames, geom.tokens_per_frame, rule[R.MD_S], rule[R.MD_T]
    if T >= F - 1:  # every frame: each query's keys are one contiguous block in space-major order
        return _ordered(R.SPACE_MAJOR, rule, geom, *tiles)
    frame_major = min(2 * T + 1, F) * (min(2 * S + block_m, P) / block_n + 1)
    space_major = min((2 * S + 1) * F + block_m, geom.grid_tokens) / block_n + 1
    if space_major * 1.5 < frame_major:
        return _ordered(R.SPACE_MAJOR, rule, geom, *tiles)
    fm = _ordered(R.FRAME_MAJOR, rule, geom, *tiles)
    if frame_major * 1.5 < space_major:
        return fm
    sm = _ordered(R.SPACE_MAJOR, rule, geom, *tiles)
    return sm if sm[4] < fm[4] else fm


def _ordered(order: int, rule, geom: VideoGeometry, block_m: int, block_n: int, segment_q_tiles: bool):
    """(order, row_ptr, runs, visited tiles, tile_cost) of a rule in `order`."""
    row_ptr, runs = tile_runs(rule, order, geom, block_m, block_n, segment_q_tiles)
    visited, full = _tile_counts(runs)
    return order, row_ptr, runs, visited, _cost(visited, full)


def _tile_counts(runs: np.ndarray) -> tuple[int, int]:
    """(visited, full) (q-tile, k-tile) pairs of the runs."""
    lengths = runs[:, 1] - runs[:, 0]
    return int(lengths.sum(dtype=np.int64)), int((lengths * runs[:, 2]).sum(dtype=np.int64))


def visited_tiles(runs: np.ndarray) -> int:
    """Number of (q-tile, k-tile) pairs the runs visit."""
    return _tile_counts(runs)[0]


def full_tiles(runs: np.ndarray) -> int:
    """Number of visited (q-tile, k-tile) pairs marked full (no mask computed)."""
    return _tile_counts(runs)[1]


def _cost(visited: int, full: int) -> float:
    """tile_cost of `visited` tiles of which `full` are full."""
    return full + PARTIAL_TILE_COST * (visited - full)


def tile_cost(runs: np.ndarray) -> float:
    """Predicted kernel work of the runs in full-tile units: full tiles count 1, partial tiles
    PARTIAL_TILE_COST."""
    return _cost(*_tile_counts(runs))


class TablePool:
    """Append-only row_ptr / runs shared by every plan of one (device, geometry, tiles, q-tiling).

    Each distinct rule (ORDER and ROW_BASE aside) is classified once; its q-tile row pointers start
    at its ROW_BASE. Device tensors are rebuilt lazily when entries were added since the last use.
    """

    def __init__(self, geom: VideoGeometry, block_m: int, block_n: int, device: torch.device,
                 segment_q_tiles: bool = True):
        self.geom, self.block_m, self.block_n, self.device = geom, block_m, block_n, device
        self.segment_q_tiles = segment_q_tiles
        self.entries: dict[tuple[int, ...], tuple[int, int, int, float]] = {}  # key -> (order, base, tiles, cost)
        self._row_ptr = [np.zeros(1, np.int64)]
        self._runs: list[np.ndarray] = []
        self._count_ptr, self._count_runs = 1, 0
        self._tensors = None
        self.cube_map: torch.Tensor | None = None  # int32 on the device once a rule runs in cube order

    def add(self, rules: list[list[int]]) -> list[tuple[int, int, int, float]]:
        """(order, row_base, visited tile count, tile_cost) of each non-skip rule. Rules not seen
        yet are classified (in `_CLASSIFY_THREADS` threads when several) and appended in the given
        order, so the pool's layout does not depend on which thread finishes first."""
        new = list({tuple(r[R.DIAG:]): r for r in rules if tuple(r[R.DIAG:]) not in self.entries}.values())

        def classify(rule):
            return _choose_order(rule, self.geom, self.block_m, self.block_n, self.segment_q_tiles)

        if len(new) > 1 and _CLASSIFY_THREADS > 1:
            with concurrent.futures.ThreadPoolExecutor(min(len(new), _CLASSIFY_THREADS)) as threads:
                classified = list(threads.map(classify, new))
        else:
            classified = [classify(r) for r in new]
        for rule, (order, row_ptr, runs, visited, cost) in zip(new, classified):
            base = self._count_ptr - 1
            self._row_ptr.append(row_ptr[1:] + self._count_runs)
            self._runs.append(runs)
            self._count_ptr += row_ptr.size - 1
            self._count_runs += runs.shape[0]
            self._tensors = None
            self.entries[tuple(rule[R.DIAG:])] = (order, base, visited, cost)
            if order == R.CUBE and self.cube_map is None:
                # cast by numpy: torch's int64 -> int32 cast takes 3-7 ms on this 2-core CPU (OpenMP threads)
                self.cube_map = torch.from_numpy(_cube_map(self.geom).astype(np.int32)).to(self.device)
        return [self.entries[tuple(r[R.DIAG:])] for r in rules]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row_ptr int32, runs int32 [R, 3]) on the pool's device."""
        if self._tensors is None:
            if self._count_runs >= 2 ** 31:
                raise ValueError("the plan table pool exceeds int32 indexing")
            row_ptr = torch.from_numpy(np.concatenate(self._row_ptr).astype(np.int32))
            runs = torch.from_numpy(np.concatenate(self._runs) if self._runs else np.zeros((0, 3), np.int32))
            self._tensors = (row_ptr.to(self.device), runs.to(self.device))
        return self._tensors

    @property
    def nbytes(self) -> int:
        """Bytes of the pool's device tensors."""
        cube = 0 if self.cube_map is None else self.cube_map.numel()
        return 4 * (self._count_ptr + 3 * self._count_runs + cube)


_POOLS: dict[tuple, TablePool] = {}


def table_pool(geom: VideoGeometry, block_m: int, block_n: int, device, segment_q_tiles: bool = True) -> TablePool:
    """The shared pool for (device, geometry, tiles, q-tiling)."""
    device = _normal_device(device)
    key = (device, geom, block_m, block_n, segment_q_tiles)
    if key not in _POOLS:
        _POOLS[key] = TablePool(geom, block_m, block_n, device, segment_q_tiles)
    return _POOLS[key]


def pool_bytes(device=None) -> int:
    """Bytes held by all table pools (of one device, or of all)."""
    device = None if device is None else _normal_device(device)
    return sum(p.nbytes for k, p in _POOLS.items() if device is None or k[0] == device)


def clear_plans() -> None:
    """Forget every compiled plan and table pool (memory is freed once no plan is referenced)."""
    _compile.cache_clear()
    _cube_classes.cache_clear()
    _code_ranges.cache_clear()
    _stripe_key_code.cache_clear()
    _frame_major_queries.cache_clear()
    _row_code.cache_clear()
    _segments.cache_clear()
    _POOLS.clear()


def _normal_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass(eq=False)
class LayerPlan:
    """The compiled tables of one layer at one geometry; `run` launches the kernel on them."""

    geometry: VideoGeometry
    patterns: tuple[Pattern, ...]
    head_rules: torch.Tensor       # int32 [H, 16] on the device, ORDER and ROW_BASE filled in
    tile_density: float            # visited tiles / all tiles, over non-skip heads (0 if none)
    pool: TablePool
    cost_density: float = 0.0      # tile_cost (partial tiles weighted) / all tiles, non-skip heads
    head_tiles: tuple[tuple[int, float], ...] = ()  # (visited tiles, tile_cost) of each head (skip: 0, 0)
    _tables: KernelTables | None = field(default=None, init=False, repr=False)

    @functools.cached_property
    def densities(self) -> tuple[float, ...]:
        """Token density of each head (computed on first use)."""
        return tuple(p.density(self.geometry) for p in self.patterns)

    @property
    def heads(self) -> int:
        return len(self.patterns)

    def masked_share(self, heads=None) -> float:
        """The share of visited tiles that are partial (masked) over `heads` (default: all; skip
        heads visit none), from each head's visited tiles and tile_cost (a masked tile counts
        PARTIAL_TILE_COST full ones)."""
        picked = [self.head_tiles[h] for h in (range(self.heads) if heads is None else heads)]
        visited = sum(v for v, _ in picked)
        if visited <= 0:
            return 0.0
        share = (sum(c for _, c in picked) - visited) / ((PARTIAL_TILE_COST - 1) * visited)
        return min(1.0, max(0.0, share))

    _split: tuple | None = field(default=None, init=False, repr=False)

    @property
    def tables(self) -> KernelTables:
        """KernelTables over the pool's current tensors (rebuilt only after the pool grew)."""
        self._tables = self._tables_over(self.head_rules, self._tables, range(self.heads))
        return self._tables

    def _tables_over(self, head_rules: torch.Tensor, cached: KernelTables | None, heads) -> KernelTables:
        """KernelTables of `head_rules` over the pool, `heads` being the heads they run (the others
        skipped: their masked share picks the kernel)."""
        pool_tensors = self.pool.tensors()
        if cached is not None and cached.row_ptr is pool_tensors[0]:
            return cached
        g = self.geometry
        bucket = min(4, max(0, round(-math.log2(max(self.tile_density, 1e-6)))))
        return KernelTables(head_rules, *pool_tensors, g.prefix, g.frames, g.height, g.width, g.seq_len,
                            self.pool.block_m, self.pool.block_n, self.pool.cube_map, bucket,
                            self.pool.segment_q_tiles, round(100 * self.masked_share(heads)))

    @functools.cached_property
    def dense_heads(self) -> tuple[int, ...]:
        """Dense heads of a layer that also has other heads (those go to the dense backend in
        `run` when it is given one); () when there are none or every head is dense."""
        dense = tuple(h for h, p in enumerate(self.patterns) if isinstance(p, Dense))
        return dense if len(dense) < len(self.patterns) else ()

    def _dense_split(self) -> tuple[KernelTables, torch.Tensor]:
        """Tables with the dense heads skipped, and their indices on the device."""
        rules, index, cached = self._split or (None, None, None)
        if rules is None:
            rules = self.head_rules.clone()
            rules[list(self.dense_heads), R.ORDER] = R.SKIP_HEAD
            index = torch.tensor(self.dense_heads, device=self.head_rules.device)
        cached = self._tables_over(rules, cached, [h for h in range(self.heads) if h not in self.dense_heads])
        self._split = (rules, index, cached)
        return cached, index

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str = "bhld",
            kv_len: torch.Tensor | None = None, backend: str = "triton", scale: float | None = None,
            dense=None):
        """Sparse attention of this layer (kernels.sparse_attention); same layout/dtype as q.

        With `dense` (the call site's dense attention, same layout, keys past kv_len masked by it),
        the default scale and the Triton backend, Dense heads of a mixed layer run through `dense` in
        one more call (cuDNN runs a dense head faster than our kernel; BENCHMARKS.md section 1).
        """
        if dense is None or scale is not None or backend != "triton" or not self.dense_heads:
            return sparse_attention(q, k, v, self.tables, layout=layout, kv_len=kv_len, scale=scale,
                                    backend=backend)
        tables, index = self._dense_split()
        out = sparse_attention(q, k, v, tables, layout=layout, kv_len=kv_len, scale=scale, backend=backend)
        head_dim = 1 if layout == "bhld" else 2
        picked = [t.index_select(head_dim, index) for t in (q, k, v)]
        out.index_copy_(head_dim, index, dense(*picked).to(out.dtype))
        return out


@functools.lru_cache(maxsize=4096)
def _compile(patterns: tuple[Pattern, ...], geom: VideoGeometry, block_m: int, block_n: int,
             device: torch.device, segment_q_tiles: bool) -> LayerPlan:
    pool = table_pool(geom, block_m, block_n, device, segment_q_tiles)
    head_rule = {p: p.head_rule(geom) for p in patterns}  # one per distinct pattern
    live = {p: r for p, r in head_rule.items() if r[R.ORDER] != R.SKIP_HEAD}
    entries = dict(zip(live, pool.add(list(live.values()))))
    compiled: dict[Pattern, tuple[list[int], int, float]] = {}  # pattern -> (rule, visited tiles, cost)
    for p, rule in head_rule.items():
        tiles, cost = 0, 0.0
        if p in entries:
            rule[R.ORDER], rule[R.ROW_BASE], tiles, cost = entries[p]
        compiled[p] = (rule, tiles, cost)
    rules = [compiled[p][0] for p in patterns]
    active = sum(r[R.ORDER] != R.SKIP_HEAD for r in rules)
    all_tiles = active * (len(_tile_bounds(geom, block_m, segment_q_tiles)) - 1) * _cdiv(geom.seq_len, block_n)
    visited, cost = (sum(compiled[p][i] for p in patterns) / all_tiles if active else 0.0 for i in (1, 2))
    head_rules = torch.tensor(rules, dtype=torch.int32).to(device)
    return LayerPlan(geom, patterns, head_rules, visited, pool, cost, tuple(compiled[p][1:] for p in patterns))


def compile_layer(patterns, geom: VideoGeometry, block_m: int, block_n: int, device="cpu",
                  segment_q_tiles: bool = True) -> LayerPlan:
    """Compile one layer's per-head patterns at `geom` into a cached LayerPlan on `device`.

    segment_q_tiles (the default) lets q-tiles restart where the grid starts and ends
    (tables.q_tile_bounds), so text rows never share a q-tile with grid rows; False keeps tiles at
    multiples of block_m, the tiling FlexAttention's block masks need."""
    patterns = tuple(patterns)
    if not patterns:
        raise ValueError("compile_layer needs at least one head pattern")
    for i, p in enumerate(patterns):
        if not isinstance(p, Pattern):
            raise ValueError(f"head {i}: expected a Pattern, got {p!r}")
    if not isinstance(geom, VideoGeometry):
        raise ValueError(f"geom must be a VideoGeometry, got {geom!r}")
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b!r}")
    return _compile(patterns, geom, block_m, block_n, _normal_device(device), bool(segment_q_tiles))


