"""The plan compiler: one layer's per-head patterns at one geometry -> KernelTables (DESIGN.md 4, 6).

Tiles are classified without an L x L mask. A q-tile (block_m consecutive physical rows) is cut
into segments: in frame-major order at frames (and rows when a window is on), in space-major
order at spatial positions. For each segment every component of the head rule gives the key
intervals, in physical order, that some query attends ("any") and that all its queries attend
("all"). A k-tile is visited when some segment's any-interval touches it (exact); it is full when
it lies inside the merged all-intervals of every grid segment of the q-tile (conservative: a full
tile marked partial is still exact, only slower). Key-only parts (non-grid keys, stripes) give
each k-tile a code (from per-key booleans when stripes are on). Tile ranges are combined by sorted sweeps over their end
points, so the cost grows with the number of intervals, never with L x L or tiles x tiles.

Cube order (ORDER 2, windows) is classified per (q-tile, k-tile) pair instead: each tile's grid
tokens span a box of frames, rows and columns, and a window attends some pair when the per-axis box
distance is within its radii (exact for box-shaped tiles, a superset for tiles straddling cubes) and
every pair when the per-axis largest distance is (conservative). Frames ascend in cube order, so
the frame test is a range of k-tiles (a band) per q-tile; only the band's pairs are compared, in
chunks. A pair's code (0 not visited, 1 partial, 2 full) is the largest of the window's, its
k-tile's key-only code and its q-tile's non-grid-row code; the runs of one code are the table.

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
from ..kernels.tables import KernelTables
from .geometry import VideoGeometry
from .patterns import Dense, Pattern


def _cdiv(a, b):
    return -(-a // b)


# A partial (masked) tile costs about this many full tiles (H200, bench/results/attention.md).
PARTIAL_TILE_COST = 3.8

# Largest number of (q-tile, k-tile) pairs the cube-order classifier compares at once.
_PAIR_CHUNK = 1 << 20

# Threads classifying a layer's new rules at once (each holds at most _PAIR_CHUNK pair codes).
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
        return tuple(np.concatenate(a).astype(np.int64) for a in (self.seg, self.start, self.end))


@functools.lru_cache(maxsize=32)
def _segments(geom: VideoGeometry, block_m: int, inner: int):
    """Grid segments [a0, a1) of physical grid positions, cut at q-tiles and at multiples of
    `inner`; returns a0, a1, each segment's q-tile and the (segment, start, end) intervals of every
    rule: any (each query attends itself) and all (itself when alone, and the non-grid keys)."""
    N, pre = geom.grid_tokens, geom.prefix
    nq = _cdiv(geom.seq_len, block_m)
    cuts = np.concatenate([np.arange(0, N + 1, inner),
                           np.clip(np.arange(nq + 1, dtype=np.int64) * block_m - pre, 0, N)])
    cuts.sort(kind="stable")  # two sorted runs: merged
    cuts = cuts[np.append(True, cuts[1:] != cuts[:-1])]
    a0, a1 = cuts[:-1], cuts[1:]
    seg = np.arange(a0.size)
    all_iv = _Intervals(seg[a1 - a0 == 1], a0[a1 - a0 == 1], a1[a1 - a0 == 1])
    for start, end in ((-pre, 0), (N, geom.seq_len - pre)):  # non-grid keys, in grid coordinates
        all_iv.add(seg, start, end)
    out = (a0, a1, (a0 + pre) // block_m, (seg, a0, a1), all_iv.arrays())
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
    segments lie in one spatial position s."""
    F, P = geom.frames, geom.tokens_per_frame
    seg = np.arange(a0.size)
    s, f0, f1 = a0 // F, a0 % F, (a1 - 1) % F
    S, T = rule[R.MD_S], rule[R.MD_T]
    keys = (np.maximum(0, s - S), np.minimum(P - 1, s + S))
    for iv, for_all, lo, hi in ((any_iv, False, f0 - T, f1 + T + 1), (all_iv, True, f1 - T, f0 + T + 1)):
        _strided(iv, for_all, block_n, seg, 0, *keys, np.maximum(0, lo), np.minimum(F, hi), F)


def _merge_per_group(group, start, end):
    """Merge each group's intervals into disjoint ones, sorted (returns group, start, end)."""
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
_EVENT_WEIGHT = np.array([1, -1, _CHANNEL, -_CHANNEL])  # range start / end, first then second channel


def _sweep(qt, lo, hi, second, nk):
    """Cover counts of tile ranges [lo, hi) per q-tile, in two channels (`second` marks ranges of
    the second): pieces (qt, start, end, first count, second count) of constant counts, sorted and
    non-empty, covering every position between a q-tile's first and last event."""
    bits = int(nk).bit_length()  # positions 0..nk
    start = ((qt.astype(np.int64) << bits) + lo) * 4 + np.where(second, 2, 0)  # event: (q, pos, kind)
    events = np.concatenate([start, start + (hi - lo) * 4 + 1])
    events.sort(kind="stable")  # timsort: sorted runs merge fast (equal events may come in any order)
    counts = np.cumsum(_EVENT_WEIGHT[events & 3])
    q, pos = events >> (bits + 2), events >> 2 & ((1 << bits) - 1)
    i = np.nonzero((q[1:] == q[:-1]) & (pos[1:] > pos[:-1]))[0]
    return q[i], pos[i], pos[i + 1], counts[i] & (_CHANNEL - 1), counts[i] >> 31


def _ranges(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of the runs of True in a 1-D bool array."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]


def _key_code(rule, order, geom: VideoGeometry, block_n: int) -> np.ndarray:
    """Per k-tile (int8): 2 when made only of keys every query attends (non-grid, stripe; keys past L
    count as such), 1 when holding such a key, else 0."""
    L, N, F, P, pre = geom.seq_len, geom.grid_tokens, geom.frames, geom.tokens_per_frame, geom.prefix
    nk = _cdiv(L, block_n)
    if rule[R.STRIPE_FIRST] <= 0 and rule[R.N_COLS] <= 0:  # non-grid keys only: two intervals
        start = np.arange(nk) * block_n
        some = (start < pre) | (np.minimum(start + block_n, L) > pre + N)
        return some.astype(np.int8) + ((start + block_n <= pre) | (start >= pre + N))
    grid = np.zeros(N, dtype=bool)  # stripes: grid intervals in frame-major order
    grid[: max(rule[R.STRIPE_FIRST], 0)] = True
    for c in range(min(rule[R.N_COLS], R.MAX_COLS)):
        grid[rule[R.COLS + 2 * c]: rule[R.COLS + 2 * c + 1]] = True
    if order == R.SPACE_MAJOR:
        grid = grid.reshape(F, P).T.ravel()
    elif order == R.CUBE:
        grid = grid[_cube_map(geom)]
    keys = np.ones(nk * block_n, dtype=bool)
    keys[pre: pre + N] = grid
    attended = keys.reshape(nk, block_n)
    some = attended.any(axis=1)
    some[-1] = keys[(nk - 1) * block_n: L].any()  # real keys only
    return some.astype(np.int8) + attended.all(axis=1)


def _row_code(geom: VideoGeometry, block_m: int) -> np.ndarray:
    """Per q-tile (int8): 2 without grid rows (every k-tile full), 1 holding a non-grid row (it attends
    every key: every k-tile visited), else 0."""
    L, N, pre = geom.seq_len, geom.grid_tokens, geom.prefix
    lo = np.arange(_cdiv(L, block_m)) * block_m
    hi = np.minimum(lo + block_m, L)
    return ((lo < pre) | (hi > pre + N)).astype(np.int8) + ((hi <= pre) | (lo >= pre + N))


def _every_tile(nq: int, lo: np.ndarray, hi: np.ndarray):
    """The k-tile ranges [lo, hi) repeated for each of nq q-tiles: (q-tile, lo, hi)."""
    return np.repeat(np.arange(nq), lo.size), np.tile(lo, nq), np.tile(hi, nq)


def tile_runs(rule, order: int, geom: VideoGeometry, block_m: int, block_n: int):
    """Range-encoded k-tiles of one head rule in physical `order`: (row_ptr [q-tiles + 1] int64,
    runs [R, 3] int32 = (k_tile_start, k_tile_end, full)), runs sorted within each q-tile."""
    if order == R.SPACE_MAJOR and (rule[R.DIAG] >= 0 or rule[R.WIN_F] >= 0):
        raise ValueError("space-major order supports multi-diagonal and stripe rules only, "
                         f"not a diagonal or window (rule {rule})")
    if order == R.CUBE:
        return _cube_tile_runs(rule, geom, block_m, block_n)
    if order == R.SPACE_MAJOR:
        inner = geom.frames
    else:  # windows need one row per segment; bands only one frame
        inner = geom.width if rule[R.WIN_F] >= 0 else geom.tokens_per_frame
    a0, a1, seg_qt, any_base, all_base = _segments(geom, block_m, inner)
    any_iv, all_iv = _Intervals(*any_base), _Intervals(*all_base)
    if order == R.FRAME_MAJOR:  # stripes are intervals in frame-major order
        for start, end in [(0, rule[R.STRIPE_FIRST])] + [(rule[R.COLS + 2 * c], rule[R.COLS + 2 * c + 1])
                                                         for c in range(max(rule[R.N_COLS], 0))]:
            all_iv.add(any_base[0], start, end)
        _frame_major_intervals(rule, geom, a0, a1, any_iv, all_iv, block_n)
    elif rule[R.MD_S] >= 0:
        _space_major_intervals(rule, geom, a0, a1, any_iv, all_iv, block_n)
    key, row = _key_code(rule, order, geom, block_n), _row_code(geom, block_m)
    full = _full_parts(all_iv, seg_qt, key, row, geom, block_m, block_n)
    visited = _visited_parts(any_iv, seg_qt, key, row, geom, block_m, block_n)
    return _encode(visited, full, _cdiv(geom.seq_len, block_m), _cdiv(geom.seq_len, block_n))


def _full_parts(all_iv: _Intervals, seg_qt, key, row, geom: VideoGeometry, block_m: int, block_n: int):
    """(q-tile, lo, hi) k-tile ranges that are full: inside the merged all-intervals of every grid
    segment of the q-tile, or full by their `key` code or their q-tile's `row` code."""
    L, pre = geom.seq_len, geom.prefix
    nq, nk = _cdiv(L, block_m), _cdiv(L, block_n)
    s, lo, hi = _merge_per_group(*all_iv.arrays())
    lo, hi = _cdiv(lo + pre, block_n), np.where(hi + pre >= L, nk, (hi + pre) // block_n)
    keep = hi > lo
    q, start, end, count, _ = _sweep(seg_qt[s[keep]], lo[keep], hi[keep], False, nk)
    segs_per_tile = np.bincount(seg_qt, minlength=nq)
    full = count == segs_per_tile[q]
    return [(q[full], start[full], end[full]), _every_tile(nq, *_ranges(key == 2)),
            _all_tiles_of(np.nonzero(row == 2)[0], nk)]


def _all_tiles_of(q_tiles: np.ndarray, nk: int):
    """(q-tile, 0, nk): every k-tile of the given q-tiles."""
    return q_tiles, np.zeros_like(q_tiles), np.full_like(q_tiles, nk)


def _visited_parts(any_iv: _Intervals, seg_qt, key, row, geom: VideoGeometry, block_m: int, block_n: int):
    """(q-tile, lo, hi) k-tile ranges that are visited: touched by an any-interval, or visited by
    their `key` code or their q-tile's `row` code."""
    L, pre = geom.seq_len, geom.prefix
    nq, nk = _cdiv(L, block_m), _cdiv(L, block_n)
    s, lo, hi = any_iv.arrays()
    return [(seg_qt[s], (lo + pre) // block_n, (hi + pre - 1) // block_n + 1), _every_tile(nq, *_ranges(key > 0)),
            _all_tiles_of(np.nonzero(row > 0)[0], nk)]


def _cube_map(geom: VideoGeometry) -> np.ndarray:
    """Cube order's physical grid position -> logical grid index (rule.cube_order_map)."""
    return R.cube_order_map(geom.frames, geom.height, geom.width).numpy()


@functools.lru_cache(maxsize=32)
def _tile_boxes(geom: VideoGeometry, block: int):
    """Cube order, tiles of `block` positions: (first grid-bearing tile, lo [3, n], hi [3, n]) with
    the per-axis (frame, row, column) min / max over each grid-bearing tile's grid tokens (int16)."""
    N, pre, P, W = geom.grid_tokens, geom.prefix, geom.tokens_per_frame, geom.width
    first, last = pre // block, (pre + N - 1) // block
    starts = np.maximum(np.arange(first, last + 1) * block - pre, 0)
    ends = np.append(starts[1:], N)
    frame = _cube_map(geom)[:P]  # every frame is laid out as the first
    lo, hi = np.empty((3, starts.size), np.int16), np.empty((3, starts.size), np.int16)
    lo[0], hi[0] = starts // P, (ends - 1) // P
    for axis, coord in ((1, frame // W), (2, frame % W)):
        coord = np.tile(coord.astype(np.int16), geom.frames)
        lo[axis], hi[axis] = np.minimum.reduceat(coord, starts), np.maximum.reduceat(coord, starts)
    lo.flags.writeable = hi.flags.writeable = False  # cached: shared by every caller
    return first, lo, hi


def _code_pieces(code: np.ndarray):
    """(start, end, code) of the runs of one nonzero code in a 1-D int8 array that starts and ends with 0."""
    edge = np.flatnonzero(code[1:] != code[:-1]) + 1  # where a run of one code starts (the last: of 0)
    kind = code[edge[:-1]]
    piece = np.nonzero(kind)[0]
    return edge[piece], edge[piece + 1], kind[piece]


def _cube_window_pieces(rule, geom: VideoGeometry, block_m: int, block_n: int, key, row):
    """Cube order, over the band of k-tiles each grid-bearing q-tile's frames +- the frame radius
    reach: pieces (q, lo, hi, code) of one code, a pair's code being the largest of the window's (from
    the tiles' boxes, see the module docstring), its k-tile's `key` and its q-tile's `row` code; and
    each q-tile's band [band_lo, band_hi) (empty without grid rows)."""
    if max(geom.frames, geom.height, geom.width) >= 1 << 14:
        raise ValueError(f"cube order needs frames, height and width below {1 << 14}, got {geom}")
    radius = (min(rule[R.WIN_F], geom.frames - 1), rule[R.WIN_Y], rule[R.WIN_X])
    q0, qlo, qhi = _tile_boxes(geom, block_m)
    k0, klo, khi = _tile_boxes(geom, block_n)
    # frames ascend in cube order: the k-tiles whose frames some pair of the q-tile's reaches
    # (visited) and every pair does (full) are ranges, offsets from `start`
    rf = radius[0]
    start = np.searchsorted(khi[0], qlo[0] - rf, "left")
    visited_end = np.searchsorted(klo[0], qhi[0] + rf, "right") - start
    width = max(int(visited_end.max()), 1)
    col = np.arange(width, dtype=np.int16 if width < 1 << 15 else np.int32)
    bounds = [np.clip(b, 0, width).astype(col.dtype)[:, None] for b in (
        visited_end, np.searchsorted(klo[0], qhi[0] - rf, "left") - start,
        np.searchsorted(khi[0], qlo[0] + rf, "right") - start)]
    pad = np.zeros((2, width), dtype=np.int16)  # k-tiles past the last grid-bearing one: out of every range
    k_lo_win = np.lib.stride_tricks.sliding_window_view(np.concatenate([klo[1:], pad], 1), width, axis=1)
    k_hi_win = np.lib.stride_tricks.sliding_window_view(np.concatenate([khi[1:], pad], 1), width, axis=1)
    key_win = np.lib.stride_tricks.sliding_window_view(np.concatenate([key[k0:], np.zeros(width, np.int8)]), width)
    nk = key.size
    pieces = []
    step = max(1, _PAIR_CHUNK // width)
    for r0 in range(0, start.size, step):
        rows = slice(r0, min(r0 + step, start.size))
        v_end, f_start, f_end = (b[rows] for b in bounds)
        code = np.zeros(v_end.size * (width + 1) + 1, dtype=np.int8)  # led by a 0, rows end with one
        pairs = code[1:].reshape(-1, width + 1)[:, :width]
        visited = col < v_end
        full = (col >= f_start) & (col < f_end)
        for axis in (1, 2):  # box distance <= r: some pair; largest distance <= r: every pair (so some)
            r, k_lo, k_hi = radius[axis], k_lo_win[axis - 1, start[rows]], k_hi_win[axis - 1, start[rows]]
            q_lo, q_hi = qlo[axis, rows, None], qhi[axis, rows, None]
            visited &= (k_lo <= q_hi + r) & (k_hi >= q_lo - r)
            full &= (k_hi <= q_lo + r) & (k_lo >= q_hi - r)
        np.add(visited, full, out=pairs, dtype=np.int8)
        np.maximum(pairs, key_win[start[rows]], out=pairs)
        np.maximum(pairs, row[q0 + rows.start: q0 + rows.stop, None], out=pairs)
        first, end, kind = _code_pieces(code)
        r, lo = np.divmod(first - 1, width + 1)
        hi = lo + end - first
        base = k0 + start[r0 + r]
        pieces.append((q0 + r0 + r, base + lo, np.minimum(base + hi, nk), kind))
    q, lo, hi, kind = (np.concatenate([p[i] for p in pieces]) for i in range(4))
    keep = lo < hi  # past the last k-tile
    band_lo, band_hi = np.zeros(row.size, np.int64), np.zeros(row.size, np.int64)
    band_lo[q0: q0 + start.size] = k0 + start
    band_hi[q0: q0 + start.size] = np.minimum(k0 + start + width, nk)
    return (q[keep], lo[keep], hi[keep], kind[keep]), band_lo, band_hi


def _cube_tile_runs(rule, geom: VideoGeometry, block_m: int, block_n: int):
    """tile_runs for cube order: each pair's code is the largest of the window's, its k-tile's key
    code and its q-tile's row code; outside a q-tile's window band only the last two count."""
    if rule[R.WIN_F] < 0 or rule[R.DIAG] >= 0 or rule[R.MD_S] >= 0:
        raise ValueError("cube order supports window rules (with stripes) only, "
                         f"not a diagonal, a spatial band or no window (rule {rule})")
    key, row = _key_code(rule, R.CUBE, geom, block_n), _row_code(geom, block_m)
    band, band_lo, band_hi = _cube_window_pieces(rule, geom, block_m, block_n, key, row)
    pieces = [band]
    for c in range(3):  # q-tiles of row code c: the runs of max(key, c) left and right of their band
        q = np.nonzero(row == c)[0][:, None]
        start, end, kind = _code_pieces(np.concatenate([[0], np.maximum(key, c), [0]]).astype(np.int8))
        for lo, hi in ((start - 1, np.minimum(end - 1, band_lo[q])), (np.maximum(start - 1, band_hi[q]), end - 1)):
            keep = lo < hi
            pieces.append(tuple(np.broadcast_to(a, keep.shape)[keep] for a in (q, lo, hi, kind)))
    q, lo, hi, kind = (np.concatenate([p[i] for p in pieces]) for i in range(4))
    order = np.argsort(q * (key.size + 1) + lo, kind="stable")
    return _runs(q[order], lo[order], hi[order], kind[order], row.size)


def _encode(visited, full, nq: int, nk: int):
    """Runs of visited k-tiles per q-tile, split where full starts or stops: (row_ptr, runs)."""
    parts = [(a, b, c, np.full(a.size, is_full)) for is_full, group in ((False, visited), (True, full))
             for a, b, c in group]
    q, start, end, n_any, n_full = _sweep(*(np.concatenate([p[i] for p in parts]) for i in range(4)), nk)
    code = (n_any > 0) * (1 + (n_full > 0))  # 0 not visited, 1 partial, 2 full
    keep = code > 0
    return _runs(q[keep], start[keep], end[keep], code[keep], nq)


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


def _choose_order(rule, geom: VideoGeometry, block_m: int, block_n: int):
    """Order and runs of a rule: the cheaper (`tile_cost`) of frame-major and cube order for a window
    without diagonal or spatial band; for a spatial band without diagonal, window or stripe keys
    (those scatter in space-major order) the cheaper of frame-major and space-major, whose costs are
    first estimated per q-tile (both orders are compiled only when the estimates are close);
    frame-major otherwise. Returns (order, row_ptr, runs)."""
    if rule[R.WIN_F] >= 0 and rule[R.DIAG] < 0 and rule[R.MD_S] < 0:
        fm = tile_runs(rule, R.FRAME_MAJOR, geom, block_m, block_n)
        cube = tile_runs(rule, R.CUBE, geom, block_m, block_n)
        return (R.CUBE,) + cube if tile_cost(cube[1]) < tile_cost(fm[1]) else (R.FRAME_MAJOR,) + fm
    if rule[R.MD_S] < 0 or rule[R.DIAG] >= 0 or rule[R.WIN_F] >= 0 or rule[R.STRIPE_FIRST] > 0 \
            or rule[R.N_COLS] > 0:
        return (R.FRAME_MAJOR,) + tile_runs(rule, R.FRAME_MAJOR, geom, block_m, block_n)
    F, P, S, T = geom.frames, geom.tokens_per_frame, rule[R.MD_S], rule[R.MD_T]
    if T >= F - 1:  # every frame: each query's keys are one contiguous block in space-major order
        return (R.SPACE_MAJOR,) + tile_runs(rule, R.SPACE_MAJOR, geom, block_m, block_n)
    frame_major = min(2 * T + 1, F) * (min(2 * S + block_m, P) / block_n + 1)
    space_major = min((2 * S + 1) * F + block_m, geom.grid_tokens) / block_n + 1
    if space_major * 1.5 < frame_major:
        return (R.SPACE_MAJOR,) + tile_runs(rule, R.SPACE_MAJOR, geom, block_m, block_n)
    fm = tile_runs(rule, R.FRAME_MAJOR, geom, block_m, block_n)
    if frame_major * 1.5 < space_major:
        return (R.FRAME_MAJOR,) + fm
    sm = tile_runs(rule, R.SPACE_MAJOR, geom, block_m, block_n)
    return (R.SPACE_MAJOR,) + sm if tile_cost(sm[1]) < tile_cost(fm[1]) else (R.FRAME_MAJOR,) + fm


def visited_tiles(runs: np.ndarray) -> int:
    """Number of (q-tile, k-tile) pairs the runs visit."""
    return int((runs[:, 1].astype(np.int64) - runs[:, 0]).sum())


def full_tiles(runs: np.ndarray) -> int:
    """Number of visited (q-tile, k-tile) pairs marked full (no mask computed)."""
    return int(((runs[:, 1].astype(np.int64) - runs[:, 0]) * (runs[:, 2] != 0)).sum())


def tile_cost(runs: np.ndarray) -> float:
    """Predicted kernel work of the runs in full-tile units: full tiles count 1, partial tiles
    PARTIAL_TILE_COST."""
    full = full_tiles(runs)
    return full + PARTIAL_TILE_COST * (visited_tiles(runs) - full)


class TablePool:
    """Append-only row_ptr / runs shared by every plan of one (device, geometry, tiles).

    Each distinct rule (ORDER and ROW_BASE aside) is classified once; its q-tile row pointers start
    at its ROW_BASE. Device tensors are rebuilt lazily when entries were added since the last use.
    """

    def __init__(self, geom: VideoGeometry, block_m: int, block_n: int, device: torch.device):
        self.geom, self.block_m, self.block_n, self.device = geom, block_m, block_n, device
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
            return _choose_order(rule, self.geom, self.block_m, self.block_n)

        if len(new) > 1 and _CLASSIFY_THREADS > 1:
            with concurrent.futures.ThreadPoolExecutor(min(len(new), _CLASSIFY_THREADS)) as threads:
                classified = list(threads.map(classify, new))
        else:
            classified = [classify(r) for r in new]
        for rule, (order, row_ptr, runs) in zip(new, classified):
            base = self._count_ptr - 1
            self._row_ptr.append(row_ptr[1:] + self._count_runs)
            self._runs.append(runs)
            self._count_ptr += row_ptr.size - 1
            self._count_runs += runs.shape[0]
            self._tensors = None
            self.entries[tuple(rule[R.DIAG:])] = (order, base, visited_tiles(runs), tile_cost(runs))
            if order == R.CUBE and self.cube_map is None:
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


def table_pool(geom: VideoGeometry, block_m: int, block_n: int, device) -> TablePool:
    """The shared pool for (device, geometry, tiles)."""
    device = _normal_device(device)
    key = (device, geom, block_m, block_n)
    if key not in _POOLS:
        _POOLS[key] = TablePool(geom, block_m, block_n, device)
    return _POOLS[key]


def pool_bytes(device=None) -> int:
    """Bytes held by all table pools (of one device, or of all)."""
    device = None if device is None else _normal_device(device)
    return sum(p.nbytes for k, p in _POOLS.items() if device is None or k[0] == device)


def clear_plans() -> None:
    """Forget every compiled plan and table pool (memory is freed once no plan is referenced)."""
    _compile.cache_clear()
    _tile_boxes.cache_clear()
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
    _tables: KernelTables | None = field(default=None, init=False, repr=False)

    @functools.cached_property
    def densities(self) -> tuple[float, ...]:
        """Token density of each head (computed on first use)."""
        return tuple(p.density(self.geometry) for p in self.patterns)

    @property
    def heads(self) -> int:
        return len(self.patterns)

    _split: tuple | None = field(default=None, init=False, repr=False)

    @property
    def tables(self) -> KernelTables:
        """KernelTables over the pool's current tensors (rebuilt only after the pool grew)."""
        self._tables = self._tables_over(self.head_rules, self._tables)
        return self._tables

    def _tables_over(self, head_rules: torch.Tensor, cached: KernelTables | None) -> KernelTables:
        pool_tensors = self.pool.tensors()
        if cached is not None and cached.row_ptr is pool_tensors[0]:
            return cached
        g = self.geometry
        bucket = min(4, max(0, round(-math.log2(max(self.tile_density, 1e-6)))))
        return KernelTables(head_rules, *pool_tensors, g.prefix, g.frames, g.height, g.width, g.seq_len,
                            self.pool.block_m, self.pool.block_n, self.pool.cube_map, bucket)

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
        cached = self._tables_over(rules, cached)
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
             device: torch.device) -> LayerPlan:
    pool = table_pool(geom, block_m, block_n, device)
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
    all_tiles = active * _cdiv(geom.seq_len, block_m) * _cdiv(geom.seq_len, block_n)
    visited, cost = (sum(compiled[p][i] for p in patterns) / all_tiles if active else 0.0 for i in (1, 2))
    head_rules = torch.tensor(rules, dtype=torch.int32).to(device)
    return LayerPlan(geom, patterns, head_rules, visited, pool, cost)


def compile_layer(patterns, geom: VideoGeometry, block_m: int, block_n: int, device="cpu") -> LayerPlan:
    """Compile one layer's per-head patterns at `geom` into a cached LayerPlan on `device`."""
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
    return _compile(patterns, geom, block_m, block_n, _normal_device(device))


