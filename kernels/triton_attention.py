"""One Triton forward kernel for all sparse heads of a layer, driven by KernelTables.

Grid: (q-tiles, batch x active heads). A program reads its head's rule row and walks the k-tile
runs of its q-tile. K/V tiles come by TMA where the launch has descriptors (Hopper+): straight from
the inputs for frame-major heads, from a per-call copy in their own physical order for space-major
and cube-order heads; otherwise rows are gathered through the head's physical->logical map. The
exact rule is evaluated only on partial tiles (or tiles crossing kv_len / the sequence end), as
packed box tests written straight into the scores, and an online softmax runs in base 2. Skip heads
are never launched; their output slice is zero-filled. Registered as the custom op
`torch.ops.sparse_vdit.sparse_attention`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

from .interpreter_fix import INTERPRET as _INTERPRET
from .rule import CUBE, FRAME_MAJOR, SPACE_MAJOR, physical_to_logical
from .tables import KernelTables, q_tile_bounds

_LOG2E = 1.0 / math.log(2.0)
_NEG_BIG = tl.constexpr(-1.0e30)  # running max start: finite, so fully masked tiles never make NaN


def _parse_configs(text: str) -> tuple:
    """(warps, stages, maxnreg or None) triples from "8x3,8x3r128" (rR caps registers per thread)."""
    triples = []
    for c in text.split(","):
        pair, _, regs = c.partition("r")
        warps, stages = (int(x) for x in pair.split("x"))
        triples.append((warps, stages, int(regs) if regs else None))
    return tuple(triples)


def _autotune_configs() -> list:
    """Load path (TMA descriptors or gathered loads) x warps x stages (x a register cap) to tune
    over, and with TMA how cube-order heads walk their runs (MERGED_CUBE, see
    `_attend_cube_runs_tma`). 8 warps at 255 registers a thread fill an SM's register file, so one
    CTA runs per SM and each q-tile's prologue, epilogue and pipeline fills are exposed; capped at
    128 (sparse layers at d = 64 only, see `_prune_configs`), two CTAs share an SM. With TMA each
    config also comes with full tiles taken two a step (PAIRED, see `_attend_tile_pairs_tma`).
    SPARSE_VDIT_TRITON_CONFIGS="8x3,8x3r128" narrows the choice. (The interpreter bypasses the
    autotuner: `launch_sparse_attention` runs the load path the call has descriptors for.)"""
    tma, gathered = ((8, 2, None), (8, 3, None), (8, 4, None), (4, 3, None), (8, 3, 128)), ((8, 2, None), (8, 3, None))
    chosen = os.environ.get("SPARSE_VDIT_TRITON_CONFIGS")
    if chosen:
        tma = gathered = _parse_configs(chosen)
    return ([triton.Config({"USE_TMA": True, "MERGED_CUBE": m, "PAIRED": p}, num_warps=w, num_stages=s, maxnreg=r)
             for m in (False, True) for p in (False, True) for w, s, r in tma]
            + [triton.Config({"USE_TMA": False, "MERGED_CUBE": False, "PAIRED": False}, num_warps=w, num_stages=s,
                             maxnreg=r)
               for w, s, r in gathered])


def tuning_repeats(estimate_ms: float, budget_ms: float = 100.0, least: int = 5, most: int = 100) -> int:
    """How many timed calls the autotuner takes of a config whose one call took `estimate_ms`:
    enough to fill `budget_ms`, but never fewer than `least` (Triton's default fills 100 ms too, so
    it times a config of more than 100 ms once, and a one-sample choice flips between runs)."""
    if not estimate_ms > 0:
        return most
    return max(least, min(most, math.ceil(budget_ms / estimate_ms)))


def _time_config(kernel_call, quantiles) -> list[float]:
    """The autotuner's timer: one call to warm up, one to estimate, then `tuning_repeats` calls
    timed one by one with CUDA events; returns those times' `quantiles` (ms; the autotuner asks for
    the median first)."""
    def timed_calls(n: int) -> torch.Tensor:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            kernel_call()
            end.record()
        torch.cuda.synchronize()
        return torch.tensor([start.elapsed_time(end) for start, end in events])

    kernel_call()
    torch.cuda.synchronize()
    times = timed_calls(tuning_repeats(float(timed_calls(1)[0])))
    return [float(torch.quantile(times, q)) for q in quantiles]


def tuned_config_name() -> str:
    """The config the autotuner ran last, as "8x3 TMA merged r128" (warps x stages, load path, cube-order
    walk, register cap), or "" before any tuned launch; benchmarks note it next to each row."""
    config = getattr(_sparse_attention_fwd, "best_config", None)
    if config is None:
        return ""
    return " ".join(filter(None, (f"{config.num_warps}x{config.num_stages}",
                                  "TMA" if config.kwargs.get("USE_TMA") else "gathered",
                                  "merged" if config.kwargs.get("MERGED_CUBE") else "",
                                  "paired" if config.kwargs.get("PAIRED") else "",
                                  f"r{config.maxnreg}" if config.maxnreg else "")))


def _prune_configs(configs, named_args, **kwargs) -> list:
    """TMA configs only when the call has descriptors; merged cube-order walks only when cube-order
    heads read copies (has_cube_copies 1), and then nothing else under SPARSE_VDIT_MERGED_CUBE=only
    (has_cube_copies 2); paired full tiles as `paired_tiles` says (0 never, 1 tuned at head_dim
    128, 2 only, with TMA) and at most 3 stages (a fourth needs 289 KB of shared memory at d = 128,
    more than a Hopper SM has); register caps only for sparse layers at head_dim 64. At 128 a CTA needs
    132 KB of shared memory at 3 stages, so two never share an SM and the cap only adds spills; a
    dense layer's long q-tiles hide their prologues, and timed alone the capped 8x3 ran dense d = 64
    at 65.71 ms against 63.01 for 4x3 uncapped (attention run I, profile call)."""
    only = named_args["has_cube_copies"] == 2
    paired = named_args["paired_tiles"]
    if paired == 1 and kwargs.get("HEAD_DIM") == 64:  # never the faster at d = 64 (attention run J)
        paired = 0
    kept = [c for c in configs if (named_args["has_desc"] or not c.kwargs["USE_TMA"])
            and (named_args["has_cube_copies"] or not c.kwargs["MERGED_CUBE"])
            and (c.kwargs["MERGED_CUBE"] or not only)
            and (paired or not c.kwargs["PAIRED"]) and (c.num_stages <= 3 or not c.kwargs["PAIRED"])
            and (c.kwargs["PAIRED"] or paired < 2 or not c.kwargs["USE_TMA"])]
    uncapped = [c for c in kept if c.maxnreg is None]
    capped_pays = kwargs.get("HEAD_DIM") == 64 and named_args["density_bucket"] > 0
    return kept if capped_pays or not uncapped else uncapped


@triton.jit
def _divmod(x, d, inv_d):
    """(x // d, x % d) for 0 <= x < 2**22 and d > 0 through fp32: (x + 0.5) / d stays 0.5 / d away
    from an integer, far more than the rounding error, so the result is exact (a hardware
    integer division by a runtime value costs ~20 instructions)."""
    q = ((x.to(tl.float32) + 0.5) * inv_d).to(tl.int32)
    return q, x - q * d


@triton.jit
def _cube_grid_index(p, prefix, N, cube_map):
    """Cube order: grid index of each physical position's token (0 off the grid)."""
    g = p - prefix
    on_grid = (g >= 0) & (g < N)
    return tl.load(cube_map + tl.where(on_grid, g, 0), mask=on_grid, other=0)


@triton.jit
def _from_cube_grid_index(p, lg, prefix, N):
    """Cube order: logical token index of each physical position from its `_cube_grid_index`."""
    g = p - prefix
    return tl.where((g >= 0) & (g < N), prefix + lg, p)


@triton.jit
def _to_logical(p, order, prefix, F, P, N, inv_F, cube_map):
    """Physical positions -> logical token indices: space-major heads permute the grid
    arithmetically, cube-order heads through the `cube_map` lookup table, frame-major heads are the
    identity. Each branch computes its own grid test, so no boolean lives across the branches (the
    compiler would pack and unpack it bit by bit)."""
    if order == 2:
        lk = _from_cube_grid_index(p, _cube_grid_index(p, prefix, N, cube_map), prefix, N)
    elif order == 1:
        g = p - prefix
        on_grid = (g >= 0) & (g < N)
        s, f = _divmod(tl.where(on_grid, g, 0), F, inv_F)
        lk = tl.where(on_grid, prefix + f * P + s, p)
    else:
        lk = p
    return lk


def box_layouts(frames: int, height: int, width: int) -> list[int]:
    """Bit layout of the packed box codes `_box_pass` compares: [window y shift, window f shift,
    window guard, multi-diagonal f shift, multi-diagonal guard] (x and s sit at bit 0). A field of a
    dimension of size d is (2d).bit_length() + 1 bits wide: any coordinate plus a radius clipped to
    d - 1 stays below its guard bit. For grids under 2**22 tokens every code fits 31 bits; guards are
    returned as signed int32 values."""
    def bits(d):
        return (2 * d).bit_length() + 1

    P = height * width
    wf, wy, wx, ws = bits(frames), bits(height), bits(width), bits(P)
    if max(wf + wy + wx, wf + ws) > 32:
        raise ValueError(f"grid {frames}x{height}x{width} is too large for the kernel's 32-bit masks")

    def signed(v):
        return v - (1 << 32) if v >= 1 << 31 else v

    win_guard = (1 << (wx - 1)) | (1 << (wx + wy - 1)) | (1 << (wx + wy + wf - 1))
    md_guard = (1 << (ws - 1)) | (1 << (ws + wf - 1))
    return [wx, wx + wy, signed(win_guard), ws, signed(md_guard)]


@triton.jit
def _box_pass(q_code, q_reach, code, radius, guard, dead):
    """Every field of the packed (query, key) codes within the box radius r, as two subtractions,
    one three-way AND and one compare per pair. q_reach = q + r + guard and k + r + guard keep every
    field below its guard bit, so nothing carries across fields; (q_reach - k) keeps a field's guard
    bit exactly when q + r >= k, (k + r + guard - q) when k + r >= q. Non-grid query rows have reach
    -1 and code 0 (they pass every key); a dead key (past kv_len or the sequence) gets code = guard,
    which fails every row."""
    k_code = tl.where(dead, guard, code)
    x = q_reach[:, None] - k_code[None, :]
    y = (code + radius + guard)[None, :] - q_code[:, None]
    return (x & y & guard) == guard


@triton.jit
def _query_codes(code, radius, guard, q_grid):
    """(code, reach) of query rows for `_box_pass`; non-grid rows attend every key."""
    return tl.where(q_grid, code, 0), tl.where(q_grid, code + radius + guard, -1)


@triton.jit
def _stripe_keys(rule, gk):
    """Keys a head's vertical stripes make global: the first `rule[8]` grid tokens and up to three
    grid ranges."""
    n_cols = tl.load(rule + 9)
    hit = gk < tl.load(rule + 8)
    hit = hit | ((n_cols > 0) & (gk >= tl.load(rule + 10)) & (gk < tl.load(rule + 11)))
    hit = hit | ((n_cols > 1) & (gk >= tl.load(rule + 12)) & (gk < tl.load(rule + 13)))
    hit = hit | ((n_cols > 2) & (gk >= tl.load(rule + 14)) & (gk < tl.load(rule + 15)))
    return hit


@triton.jit
def _first_cut_tile(order, kv_end, prefix, N, P, BLOCK_N: tl.constexpr):
    """The first k-tile that may hold a key past kv_end (or the sequence end): from it on even a
    full tile is masked. A space-major head cut inside the grid has its cut keys spread over all
    tiles, a cube-order head over the rest of the cut frame."""
    first = kv_end // BLOCK_N
    if (order == 1) & (kv_end < prefix + N):
        first = 0
    if (order == 2) & (kv_end > prefix) & (kv_end < prefix + N):
        first = (prefix + (kv_end - prefix) // P * P) // BLOCK_N
    return first


@triton.jit
def _query_box(rule, lq, prefix, F, W, P, N, inv_P, inv_W, win_y_shift, win_f_shift, win_guard, md_f_shift,
               md_guard):
    """`_masked_scores`' `box` for the query rows `lq` (logical indices) of the head whose rule row
    starts at `rule`: the head's boxes (radii clipped to the grid, so every packed field stays below
    its guard bit) and the rows' query codes; a head with no component attends itself (a diagonal
    of radius 0)."""
    gq = lq - prefix
    q_grid = (gq >= 0) & (gq < N)
    gq = tl.where(q_grid, gq, 0)
    fq, sq = _divmod(gq, P, inv_P)
    yq, xq = _divmod(sq, W, inv_W)
    diag = tl.load(rule + 2)
    md_s, md_t = tl.load(rule + 3), tl.load(rule + 4)
    win_f, win_y, win_x = tl.load(rule + 5), tl.load(rule + 6), tl.load(rule + 7)
    md_on = (md_s >= 0) & (md_t >= 0)
    win_on = (win_f >= 0) & (win_y >= 0) & (win_x >= 0)
    diag_on = (diag >= 0) | ((md_on == 0) & (win_on == 0))
    r_g = tl.minimum(tl.maximum(diag, 0), N - 1)
    r_md = (tl.minimum(md_t, F - 1) << md_f_shift) | tl.minimum(md_s, P - 1)
    r_win = ((tl.minimum(win_f, F - 1) << win_f_shift) | (tl.minimum(win_y, P // W - 1) << win_y_shift)
             | tl.minimum(win_x, W - 1))
    # the diagonal: g_q + r - g_k in [0, 2r] (unsigned); non-grid rows pass every live key
    # (2**30 - g_k <= 2**31 - 1), dead keys (g_k = -2**30) fail every row
    q_g_reach = tl.where(q_grid, gq + r_g, 1 << 30)
    q_g_span = tl.where(q_grid, 2 * r_g, (1 << 31) - 1).to(tl.uint32, bitcast=True)
    q_md, q_md_reach = _query_codes((fq << md_f_shift) | sq, r_md, md_guard, q_grid)
    q_win, q_win_reach = _query_codes((fq << win_f_shift) | (yq << win_y_shift) | xq, r_win, win_guard, q_grid)
    has_stripes = (tl.load(rule + 8) > 0) | (tl.load(rule + 9) > 0)
    lay = (win_y_shift, win_f_shift, win_guard, md_f_shift, md_guard)
    return (rule, has_stripes, lay, diag_on, q_g_reach, q_g_span, md_on, q_md, q_md_reach, r_md,
            win_on, q_win, q_win_reach, r_win)


@triton.jit
def _masked_scores(s, box, lk, prefix, P, W, N, inv_P, inv_W, kv_end):
    """One tile's scores with the exact rule of kernels/rule.py applied (-inf where a pair is not
    attended): always-attended keys (non-grid, stripes) first, then the OR of the head's enabled
    boxes (diagonal over g, multi-diagonal over (f, s), window over (f, y, x)), each written
    straight into the scores so no boolean tile lives across branches. `box` holds the head's
    per-q-tile query codes and scalars (see the kernel's prologue); key coordinates are derived
    only for the enabled boxes."""
    (rule, has_stripes, lay, diag_on, q_g_reach, q_g_span, md_on, q_md, q_md_reach, r_md,
     win_on, q_win, q_win_reach, r_win) = box
    gk = lk - prefix
    k_grid = (gk >= 0) & (gk < N)
    always = k_grid == 0
    if has_stripes:
        always = always | _stripe_keys(rule, gk)
    out = tl.where((always & (lk < kv_end))[None, :], s, float("-inf"))
    gk = tl.where(k_grid, gk, 0)
    if diag_on:  # |g_q - g_k| <= r as one subtraction and one unsigned compare (see the prologue)
        gk_live = tl.where(lk >= kv_end, -(1 << 30), gk)
        near = (q_g_reach[:, None] - gk_live[None, :]).to(tl.uint32, bitcast=True) <= q_g_span[:, None]
        out = tl.where(near, s, out)
    if md_on | win_on:
        fk, sk = _divmod(gk, P, inv_P)
        if md_on:
            code = (fk << lay[3]) | sk
            out = tl.where(_box_pass(q_md, q_md_reach, code, r_md, lay[4], lk >= kv_end), s, out)
        if win_on:
            yk, xk = _divmod(sk, W, inv_W)
            code = (fk << lay[1]) | (yk << lay[0]) | xk
            out = tl.where(_box_pass(q_win, q_win_reach, code, r_win, lay[2], lk >= kv_end), s, out)
    return out


@triton.jit
def _online_softmax_step(acc, m_i, l_i, s, v, qk_scale, PRECISION: tl.constexpr):
    """Fold one k-tile's scores `s` (masked entries -inf) and values `v` into the running state."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_tiles(acc, m_i, l_i, q, box, kt_lo, kt_hi, k_base, v_base, stride_kl, stride_vl, order, cube_map,
                  prefix, F, P, W, N, L, kv_end, qk_scale, inv_F, inv_P, inv_W, HEAD_DIM: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update over k-tiles [kt_lo, kt_hi) with K/V rows gathered through the head's
    physical->logical map; MASKED applies the rule (`box`, see `_masked_scores`) and kv_len."""
    offs_d = tl.arange(0, HEAD_DIM)
    for kt in range(kt_lo, kt_hi):
        offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
        lk = _to_logical(offs_n, order, prefix, F, P, N, inv_F, cube_map)
        k_valid = offs_n < L
        k = tl.load(k_base + lk.to(tl.int64)[:, None] * stride_kl + offs_d[None, :],
                    mask=k_valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:
            s = _masked_scores(s, box, lk, prefix, P, W, N, inv_P, inv_W, kv_end)
        v = tl.load(v_base + lk.to(tl.int64)[:, None] * stride_vl + offs_d[None, :],
                    mask=k_valid[:, None], other=0.0)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, qk_scale, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attend_tiles_tma(acc, m_i, l_i, q, box, kt_lo, kt_hi, desc_k, desc_v, k_row, k_col, v_row, v_col,
                      order, cube_map, prefix, F, P, W, N, kv_end, qk_scale, inv_F, inv_P, inv_W,
                      BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update over k-tiles [kt_lo, kt_hi) whose K/V rows lie in the head's physical
    order (frame-major heads: the inputs themselves; space-major and cube-order heads: copies in
    their order), so a tile is BLOCK_N consecutive rows fetched by TMA through 2D descriptors (`*_row`/`*_col`:
    where this head's position 0 is); MASKED applies the rule and kv_len to the tile's logical
    keys. Rows past a head's end belong to the next head or sample (or are zero-filled past the
    tensor): they are finite and always masked (dead keys)."""
    for kt in range(kt_lo, kt_hi):
        k = desc_k.load([k_row + kt * BLOCK_N, k_col])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:
            lk = _to_logical(kt * BLOCK_N + tl.arange(0, BLOCK_N), order, prefix, F, P, N, inv_F, cube_map)
            s = _masked_scores(s, box, lk, prefix, P, W, N, inv_P, inv_W, kv_end)
        v = desc_v.load([v_row + kt * BLOCK_N, v_col])
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, qk_scale, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attend_run(acc, m_i, l_i, q, box, kt_lo, split, kt_hi, k_base, v_base, stride_kl, stride_vl, order,
                cube_map, prefix, F, P, W, N, L, kv_end, qk_scale, inv_F, inv_P, inv_W,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One run of k-tiles with gathered loads: [kt_lo, split) without the rule, [split, kt_hi) with it."""
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, box, kt_lo, split, k_base, v_base, stride_kl, stride_vl,
                                  order, cube_map, prefix, F, P, W, N, L, kv_end, qk_scale, inv_F, inv_P, inv_W,
                                  HEAD_DIM, BLOCK_N, False, PRECISION)
    return _attend_tiles(acc, m_i, l_i, q, box, split, kt_hi, k_base, v_base, stride_kl, stride_vl,
                         order, cube_map, prefix, F, P, W, N, L, kv_end, qk_scale, inv_F, inv_P, inv_W,
                         HEAD_DIM, BLOCK_N, True, PRECISION)


@triton.jit
def _attend_tile_pairs_tma(acc, m_i, l_i, q, kt_lo, kt_hi, desc_k, desc_v, k_row, k_col, v_row, v_col, qk_scale,
                           BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Full k-tiles [kt_lo, kt_hi) (an even count) by TMA, two a step under one online-softmax
    update: one row max over both tiles and one rescale of the accumulator per 2 * BLOCK_N keys, the
    work a 128-key tile saves, while the tables, the masked tiles and the shared memory a stage needs
    per load stay those of BLOCK_N."""
    for kt in range(kt_lo, kt_hi, 2):
        k0 = desc_k.load([k_row + kt * BLOCK_N, k_col])
        k1 = desc_k.load([k_row + (kt + 1) * BLOCK_N, k_col])
        s0 = tl.dot(q, tl.trans(k0), input_precision=PRECISION)
        s1 = tl.dot(q, tl.trans(k1), input_precision=PRECISION)
        m_new = tl.maximum(m_i, tl.max(tl.maximum(s0, s1), 1) * qk_scale)
        p0 = tl.math.exp2(s0 * qk_scale - m_new[:, None])
        p1 = tl.math.exp2(s1 * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p0, 1) + tl.sum(p1, 1)
        v0 = desc_v.load([v_row + kt * BLOCK_N, v_col])
        v1 = desc_v.load([v_row + (kt + 1) * BLOCK_N, v_col])
        acc = tl.dot(p0.to(v0.dtype), v0, acc * alpha[:, None], input_precision=PRECISION)
        acc = tl.dot(p1.to(v1.dtype), v1, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_run_tma(acc, m_i, l_i, q, box, kt_lo, split, kt_hi, desc_k, desc_v, k_row, k_col, v_row, v_col,
                    order, cube_map, prefix, F, P, W, N, kv_end, qk_scale, inv_F, inv_P, inv_W,
                    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, PAIRED: tl.constexpr):
    """One run of k-tiles loaded by TMA: [kt_lo, split) without the rule (PAIRED: two tiles a step,
    the odd one alone), [split, kt_hi) with it."""
    if PAIRED:
        pairs_end = kt_lo + (split - kt_lo) // 2 * 2
        acc, m_i, l_i = _attend_tile_pairs_tma(acc, m_i, l_i, q, kt_lo, pairs_end, desc_k, desc_v, k_row, k_col,
                                               v_row, v_col, qk_scale, BLOCK_N, PRECISION)
        kt_lo = pairs_end
    acc, m_i, l_i = _attend_tiles_tma(acc, m_i, l_i, q, box, kt_lo, split, desc_k, desc_v, k_row, k_col,
                                      v_row, v_col, order, cube_map, prefix, F, P, W, N, kv_end, qk_scale,
                                      inv_F, inv_P, inv_W, BLOCK_N, False, PRECISION)
    return _attend_tiles_tma(acc, m_i, l_i, q, box, split, kt_hi, desc_k, desc_v, k_row, k_col,
                             v_row, v_col, order, cube_map, prefix, F, P, W, N, kv_end, qk_scale,
                             inv_F, inv_P, inv_W, BLOCK_N, True, PRECISION)


@triton.jit
def _first_run(RUNS, run_lo, run_hi):
    """(tiles in runs [run_lo, run_hi), first run's start, end, full flag); zeros without runs."""
    n = 0
    for r in range(run_lo, run_hi):
        n += tl.load(RUNS + 3 * r + 1) - tl.load(RUNS + 3 * r)
    some = run_hi > run_lo
    return (n, tl.load(RUNS + 3 * run_lo, mask=some, other=0), tl.load(RUNS + 3 * run_lo + 1, mask=some, other=0),
            tl.load(RUNS + 3 * run_lo + 2, mask=some, other=0))


@triton.jit
def _next_tile(RUNS, r, kt, hi, full, run_hi):
    """Step (run, k-tile, run end, full flag) to the next tile of a q-tile's runs (branch-free, so
    the loop's TMA loads stay software-pipelined)."""
    kt += 1
    step = kt == hi
    r = tl.where(step, r + 1, r)
    some = step & (r < run_hi)
    kt = tl.where(step, tl.load(RUNS + 3 * r, mask=some, other=0), kt)
    hi = tl.where(step, tl.load(RUNS + 3 * r + 1, mask=some, other=0), hi)
    full = tl.where(step, tl.load(RUNS + 3 * r + 2, mask=some, other=0), full)
    return r, kt, hi, full


@triton.jit
def _attend_cube_runs_tma(acc, m_i, l_i, q, box, RUNS, run_lo, run_hi, first_cut_tile, desc_k, desc_v, row, cube_map,
                          prefix, P, W, N, kv_end, qk_scale, inv_P, inv_W, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """A cube-order head's runs [run_lo, run_hi) from its copy (`row`: its position 0) in ONE
    software-pipelined loop, full and partial tiles alike, instead of a full and a masked loop per
    run: cube-order windows have many short runs of mostly partial tiles, and each loop entry
    drains and refills the TMA pipeline. Each tile's logical keys are looked up one tile ahead, so
    the lookup's latency hides behind the previous tile's softmax and PV MMA, and the rule enters as
    a 0 / -inf bias tile the QK MMA accumulates onto (masking the scores after the MMA makes the
    compiler run the softmax in two register layouts). Measured (run G, BENCHMARKS.md): much faster
    for window-heavy layers, slower on full tiles, so the autotuner chooses per layer."""
    offs_n = tl.arange(0, BLOCK_N)
    n, kt, hi, full = _first_run(RUNS, run_lo, run_hi)
    r = run_lo
    lg = _cube_grid_index(kt * BLOCK_N + offs_n, prefix, N, cube_map)
    for _ in range(0, n):
        p = kt * BLOCK_N + offs_n
        bias = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if (full == 0) | (kt >= first_cut_tile):
            lk = _from_cube_grid_index(p, lg, prefix, N)
            bias = _masked_scores(bias, box, lk, prefix, P, W, N, inv_P, inv_W, kv_end)
        k = desc_k.load([row + kt * BLOCK_N, 0])
        s = tl.dot(q, tl.trans(k), bias, input_precision=PRECISION)
        v = desc_v.load([row + kt * BLOCK_N, 0])
        r, kt, hi, full = _next_tile(RUNS, r, kt, hi, full, run_hi)
        lg = _cube_grid_index(kt * BLOCK_N + offs_n, prefix, N, cube_map)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, qk_scale, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _work_item(pid, n_active, n_q, n_lead, trail_start):
    """(q-tile, active-head index) of program `pid`. The q-tiles holding non-grid rows (text: the
    first `n_lead` and those from `trail_start` on), which attend every key and so cost up to
    1/density grid tiles, come first for every head; then each head's grid tiles in order. Launched
    in q-tile order, the last head's text tiles started last and ran alone on a few SMs (15-23% of
    a CogVideoX1.5 layer at density 0.1, ncu)."""
    n_heavy = n_lead + n_q - trail_start
    heavy = pid < n_heavy * n_active
    light = tl.where(heavy, 0, pid - n_heavy * n_active)
    n_light = tl.maximum(trail_start - n_lead, 1)
    per_head = tl.maximum(n_heavy, 1)
    j = pid % per_head
    heavy_tile = tl.where(j < n_lead, j, trail_start + j - n_lead)
    q_tile = tl.where(heavy, heavy_tile, n_lead + light % n_light)
    head = tl.where(heavy, pid // per_head, light // n_light)
    return q_tile, head


@triton.jit
def _q_tile_rows(t, cut1, cut2, L, BLOCK_M: tl.constexpr):
    """(first row, end) of q-tile t: tiles of BLOCK_M rows that restart at cut1 and cut2
    (tables.q_tile_bounds: the grid's bounds for segment-aligned tiles, 0 and 0 otherwise)."""
    n1 = tl.cdiv(cut1, BLOCK_M)
    n2 = n1 + tl.cdiv(cut2 - cut1, BLOCK_M)
    start = tl.where(t < n1, t * BLOCK_M, tl.where(t < n2, cut1 + (t - n1) * BLOCK_M, cut2 + (t - n2) * BLOCK_M))
    end = tl.minimum(start + BLOCK_M, tl.where(t < n1, cut1, tl.where(t < n2, cut2, L)))
    return start, end


@triton.jit
def _program_setup(RULES, ACTIVE, KV_LEN, n_active, q_cut1, q_cut2, n_q, n_lead, trail_start, L, prefix, N, P,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KV_LEN: tl.constexpr):
    """This program's work, shared by the Triton and Gluon kernels: (q-tile, sample, head, the head's
    rule row, its ORDER and ROW_BASE, the sample's live key end, the first cut k-tile, the q-tile's
    first row and end)."""
    pid_m, a = _work_item(tl.program_id(0), n_active, n_q, n_lead, trail_start)
    b = tl.program_id(1).to(tl.int64)
    h = tl.load(ACTIVE + a).to(tl.int64)
    rule = RULES + h * 16
    order = tl.load(rule + 0)
    row_base = tl.load(rule + 1)
    if HAS_KV_LEN:
        kv_end = tl.minimum(tl.load(KV_LEN + b), L)
    else:
        kv_end = L
    m_start, m_end = _q_tile_rows(pid_m, q_cut1, q_cut2, L, BLOCK_M)
    return (pid_m, b, h, rule, order, row_base, kv_end, _first_cut_tile(order, kv_end, prefix, N, P, BLOCK_N),
            m_start, m_end)


# work_bucket (bit length of the program count), density_bucket (the layer's visited-tile density,
# log2 steps), has_desc, has_cube_copies and paired_tiles are only autotune keys: the best load path,
# run walk and warps/stages depend on how many programs fill the GPU and how many runs and partial
# tiles each walks (a dense layer's best config is not a sparse one's), TMA configs need descriptors,
# merged cube-order walks need cube-order heads reading copies, and either choice may be forced
# (`_tuned_choice`).
@triton.autotune(configs=_autotune_configs(),
                 key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "PRECISION", "work_bucket", "density_bucket", "has_desc",
                      "has_cube_copies", "paired_tiles"],
                 prune_configs_by={"early_config_prune": _prune_configs},
                 do_bench=_time_config, cache_results=True)
@triton.jit(do_not_specialize=["n_active", "q_cut1", "q_cut2", "n_q", "n_lead", "trail_start", "work_bucket",
                               "has_cube_copies", "paired_tiles"])  # one binary a config
def _sparse_attention_fwd(
    Q, K, V, O, RULES, ROW_PTR, RUNS, ACTIVE, KV_LEN, CUBE_MAP, DESC_K, DESC_V, DESC_KS, DESC_VS, SLOT,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl, stride_ob, stride_oh, stride_ol,
    n_active, q_cut1, q_cut2, n_q, n_lead, trail_start,
    L, prefix, F, W, P, N, inv_F, inv_W, inv_P, qk_scale, work_bucket, density_bucket, has_desc,
    win_y_shift, win_f_shift, win_guard, md_f_shift, md_guard, n_slots, has_cube_copies, paired_tiles,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KV_LEN: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr, MERGED_CUBE: tl.constexpr,
    PAIRED: tl.constexpr,
):
    (pid_m, b, h, rule, order, row_base, kv_end, first_cut_tile, m_start, m_end) = _program_setup(
        RULES, ACTIVE, KV_LEN, n_active, q_cut1, q_cut2, n_q, n_lead, trail_start, L, prefix, N, P, BLOCK_M,
        BLOCK_N, HAS_KV_LEN)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_valid = offs_m < m_end
    lq = _to_logical(tl.where(q_valid, offs_m, m_start), order, prefix, F, P, N, inv_F, CUBE_MAP)
    q_ptrs = Q + b * stride_qb + h * stride_qh + lq.to(tl.int64)[:, None] * stride_ql + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_valid[:, None], other=0.0)
    box = _query_box(rule, lq, prefix, F, W, P, N, inv_P, inv_W, win_y_shift, win_f_shift, win_guard, md_f_shift,
                     md_guard)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if USE_TMA:
        # this head's token 0 as (row, column) of the 2D descriptors (rows of stride stride_kl)
        k_off = b * stride_kb + h * stride_kh
        v_off = b * stride_vb + h * stride_vh
        k_row, v_row = (k_off // stride_kl).to(tl.int32), (v_off // stride_vl).to(tl.int32)
        k_col, v_col = (k_off % stride_kl).to(tl.int32), (v_off % stride_vl).to(tl.int32)

    run_lo = tl.load(ROW_PTR + row_base + pid_m)
    run_hi = tl.load(ROW_PTR + row_base + pid_m + 1)
    if MERGED_CUBE and order == 2:  # MERGED_CUBE is compile-time, tuned only when cube-order heads have copies
        s_row = ((b * n_slots + tl.load(SLOT + h)) * L).to(tl.int32)
        acc, m_i, l_i = _attend_cube_runs_tma(acc, m_i, l_i, q, box, RUNS, run_lo, run_hi, first_cut_tile, DESC_KS,
                                              DESC_VS, s_row, CUBE_MAP, prefix, P, W, N, kv_end, qk_scale, inv_P,
                                              inv_W, BLOCK_M, BLOCK_N, PRECISION)
    else:
        for r in range(run_lo, run_hi):
            kt_lo = tl.load(RUNS + 3 * r)
            kt_hi = tl.load(RUNS + 3 * r + 1)
            full = tl.load(RUNS + 3 * r + 2)
            # full tiles before the cut need no mask; partial tiles and the rest do
            split = tl.where(full != 0, tl.maximum(kt_lo, tl.minimum(kt_hi, first_cut_tile)), kt_lo)
            if USE_TMA and order == 0:  # USE_TMA is compile-time: without descriptors only gathered loads exist
                acc, m_i, l_i = _attend_run_tma(acc, m_i, l_i, q, box, kt_lo, split, kt_hi, DESC_K, DESC_V,
                                                k_row, k_col, v_row, v_col, order, CUBE_MAP, prefix, F, P, W, N,
                                                kv_end, qk_scale, inv_F, inv_P, inv_W, BLOCK_N, PRECISION, PAIRED)
            elif USE_TMA and n_slots > 0:  # a space-major or cube-order head's copy in its order [B, slots, L, D]
                s_row = ((b * n_slots + tl.load(SLOT + h)) * L).to(tl.int32)
                acc, m_i, l_i = _attend_run_tma(acc, m_i, l_i, q, box, kt_lo, split, kt_hi, DESC_KS, DESC_VS,
                                                s_row, 0, s_row, 0, order, CUBE_MAP, prefix, F, P, W, N,
                                                kv_end, qk_scale, inv_F, inv_P, inv_W, BLOCK_N, PRECISION, PAIRED)
            else:
                acc, m_i, l_i = _attend_run(acc, m_i, l_i, q, box, kt_lo, split, kt_hi, k_base, v_base,
                                            stride_kl, stride_vl, order, CUBE_MAP, prefix, F, P, W, N, L,
                                            kv_end, qk_scale, inv_F, inv_P, inv_W, HEAD_DIM, BLOCK_N, PRECISION)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + lq.to(tl.int64)[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_valid[:, None])


_REUSE_TUNED = [0]  # depth of reuse_tuned_configs() blocks


@contextlib.contextmanager
def reuse_tuned_configs():
    """Inside this block a launch whose autotune key is new takes the config already tuned for the
    nearest work bucket (same head_dim, tiles, precision, dtype) instead of benchmarking every
    config again; with nothing tuned yet it autotunes as usual. For callers that launch many head
    mixes of one geometry (the strategy search): each new work bucket would cost a full autotune."""
    _REUSE_TUNED[0] += 1
    try:
        yield
    finally:
        _REUSE_TUNED[0] -= 1


def _nearest_tuned(key: tuple):
    """Launch options of the config tuned for the nearest (work bucket, density bucket) under the
    same head_dim, tiles, precision, descriptor availability and dtypes as `key` (the autotune key
    of this launch), or None when `key` itself is tuned or nothing fits (then the autotuner runs)."""
    best = None
    for tuned, config in dict(getattr(_sparse_attention_fwd, "cache", None) or {}).items():
        if tuned[:4] != key[:4] or tuned[6:] != key[6:]:
            continue
        if tuned == key:
            return None
        distance = (abs(tuned[4] - key[4]), abs(tuned[5] - key[5]))
        if best is None or distance < best[0]:
            best = (distance, config)
    if best is None:
        return None
    config = best[1]
    if hasattr(config, "all_kwargs"):
        return config.all_kwargs()
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _bhld(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "bhld" else x.transpose(1, 2)


def _tma_enabled() -> bool:
    """TMA descriptors for frame-major full tiles: on by default on Hopper and newer GPUs and under
    the interpreter; SPARSE_VDIT_TMA=0 turns them off (the gathered-load path then runs every tile)."""
    return os.environ.get("SPARSE_VDIT_TMA", "1") != "0"


GLUON_TRITON = (3, 6)  # the Triton release the Gluon kernel is built and tested with (its API moves)
GLUON_MODES = ("auto", "0", "1", "r128", "ws")
GLUON_MASKED_PERCENT = 25  # auto picks the Triton kernel above this share of masked tiles (`_gluon_mode`)


@functools.cache
def _warn_unknown_gluon_mode(mode: str) -> None:
    warnings.warn(f"SPARSE_VDIT_GLUON={mode!r} is not one of {', '.join(GLUON_MODES)}: the Triton kernel runs",
                  stacklevel=4)


def _gluon_mode(q: torch.Tensor, block_m: int, masked_percent: int = 0) -> Optional[str]:
    """Which Gluon kernel (kernels/gluon_attention.py) this launch runs, or None for the Triton one.
    SPARSE_VDIT_GLUON: 0 never, 1 uncapped, r128 at most 128 registers a thread, ws warp-specialized
    (one loader warp); unset or auto: r128 at head_dim 64 (attention run M: faster than the Triton
    kernel in every CogVideoX1.5 row) and ws at 128 (run N: faster in every Wan2.1-14B dense, band and
    multi-diagonal row), unless more than GLUON_MASKED_PERCENT of the layer's visited tiles are masked:
    the Gluon kernel takes masked tiles one at a time, and 3D-window layers with 37-94% of them ran
    7.5-23% slower there (run N). Only on sm_90 with fp16/bf16, 128-row q-tiles and, in auto, Triton
    3.6; another value warns once and runs the Triton kernel."""
    if not (q.is_cuda and block_m == 128 and q.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(q.device) == (9, 0)):
        return None
    mode = os.environ.get("SPARSE_VDIT_GLUON", "auto")
    if mode == "auto":
        tested = tuple(int(x) for x in triton.__version__.split(".")[:2]) == GLUON_TRITON
        if not tested or masked_percent > GLUON_MASKED_PERCENT:
            return None
        return {64: "r128", 128: "ws"}.get(q.shape[-1])
    if mode not in GLUON_MODES:
        _warn_unknown_gluon_mode(mode)
    return mode if mode in ("1", "r128", "ws") else None


def _tuned_choice(variable: str) -> int:
    """How an autotuned kernel choice is made, from an environment variable: 1 (default: the
    autotuner times it against the alternative), 0 (=0: never) or 2 (=only: always; for tests and
    benchmarks). SPARSE_VDIT_MERGED_CUBE: the merged walk of cube-order heads reading copies
    (`_attend_cube_runs_tma`); SPARSE_VDIT_PAIRED_TILES: full TMA tiles two a step
    (`_attend_tile_pairs_tma`)."""
    return {"0": 0, "only": 2}.get(os.environ.get(variable, "1"), 1)


def _row_view(x: torch.Tensor) -> Optional[tuple[int, int]]:
    """(rows, row stride) of x ([B, H, L, D], last dim contiguous) viewed as rows of its token stride,
    every head's D values inside one row, or None when x's strides or alignment don't allow a TMA
    descriptor over that view."""
    B, H, L, D = x.shape
    sb, sh, sl, sd = x.stride()
    if sd != 1 or sl < D or (sl * x.element_size()) % 16 or x.data_ptr() % 16:
        return None
    starts = [b * sb + h * sh for b in range(B) for h in range(H)]
    if any(o % sl + D > sl for o in starts):
        return None
    rows = max(starts) // sl + L
    if rows >= 2**31:
        return None
    return rows, sl


def _row_descriptor(x: torch.Tensor, block_rows: int):
    """A 2D TMA descriptor over `_row_view` of x, or None when x does not allow one."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    view = _row_view(x)
    if view is None:
        return None
    rows, sl = view
    return TensorDescriptor(x, [rows, sl], [sl, 1], [block_rows, x.shape[-1]])


@functools.lru_cache(maxsize=16)
def _physical_rows(prefix: int, frames: int, height: int, width: int, L: int, device: str) -> torch.Tensor:
    """int64 [3, L]: the token (logical) row at each physical position of each order (frame-major,
    space-major, cube)."""
    positions = torch.arange(L)
    return torch.stack([physical_to_logical(positions, o, prefix, frames, height, width)
                        for o in (FRAME_MAJOR, SPACE_MAJOR, CUBE)]).to(device)


def _gather_rows(x: torch.Tensor, heads: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[:, heads[:, None], rows] for x [B, H, L, D], moved as 8-byte words when x's rows allow
    (torch's gather costs per element: 2-byte elements ran at 0.7 TB/s on the H200, ncu)."""
    words = 8 // x.element_size()
    if x.element_size() < 8 and x.stride(-1) == 1 and x.shape[-1] % words == 0 and \
            all(s % words == 0 for s in x.stride()[:-1]) and x.storage_offset() % words == 0:
        return x.view(torch.int64)[:, heads[:, None], rows].view(x.dtype)
    return x[:, heads[:, None], rows]


def _physical_order_copies(kb: torch.Tensor, vb: torch.Tensor, heads: torch.Tensor, orders: torch.Tensor,
                           geometry: list[int], block_n: int, describe=None):
    """TMA descriptors (`describe`, default `_row_descriptor`) over copies [B, len(heads), L, D] of
    these heads' K and V rows in their own physical order (`orders`: space-major or cube), so their
    tiles are consecutive rows like a frame-major head's (one memory-bound gather of 2·L·D elements
    per head, not timed apart); None when a copy can't get a descriptor."""
    rows = _physical_rows(*geometry, kb.shape[2], str(kb.device))[orders.long()]
    copies = tuple((describe or _row_descriptor)(_gather_rows(x, heads, rows), block_n) for x in (kb, vb))
    return None if None in copies else copies


def work_order(prefix: int, grid_tokens: int, L: int, block_m: int, segment_q_tiles: bool) -> tuple[int, ...]:
    """The q-tiling's kernel arguments: (cut1, cut2) where tiles restart (`_q_tile_rows`), the
    q-tile count, the tiles before the first grid-only tile and the first tile after the grid's
    tiles that holds a suffix row (`_work_item`)."""
    cuts = (prefix, prefix + grid_tokens) if segment_q_tiles else (0, 0)
    bounds = q_tile_bounds(prefix, grid_tokens, L, block_m, segment_q_tiles)
    n_q = len(bounds) - 1
    n_lead = int(np.searchsorted(bounds[:-1], prefix))  # tiles starting inside the prefix
    grid_end = prefix + grid_tokens
    trail_start = max(int(np.searchsorted(bounds[1:], grid_end, "right")), n_lead) if grid_end < L else n_q
    return cuts + (n_q, n_lead, trail_start)


def launch_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                            head_rules: torch.Tensor, row_ptr: torch.Tensor, runs: torch.Tensor,
                            active_heads: torch.Tensor, skip_heads: torch.Tensor,
                            kv_len: Optional[torch.Tensor], cube_map: Optional[torch.Tensor],
                            geometry: list[int], block_m: int, block_n: int, layout: str,
                            scale: float, density_bucket: int = 0,
                            permuted: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                            segment_q_tiles: bool = True, masked_percent: int = 0) -> None:
    """Write sparse attention into `out` (same layout as q): skip heads zero-filled, active heads
    by the kernel. geometry = [prefix, frames, height, width]; cube_map is needed when a head runs
    in cube order (pass None otherwise: it also tells the autotuner whether cube-order walks
    matter); density_bucket (KernelTables.density_bucket) only keys the autotuning;
    permuted = (heads, slots, orders) from KernelTables.launch_heads lets space-major and
    cube-order heads load by TMA from copies of their K/V in their own order; segment_q_tiles is
    the tables' q-tiling (tables.q_tile_bounds); masked_percent (KernelTables.masked_percent) picks the
    kernel (`_gluon_mode`); inputs must already be validated."""
    qb, kb, vb, ob = (_bhld(t, layout) for t in (q, k, v, out))
    B, _, L, D = qb.shape
    prefix, frames, height, width = geometry
    P = height * width
    if skip_heads.numel():
        ob.index_fill_(1, skip_heads, 0)
    n_active = active_heads.numel()
    if n_active == 0:
        return
    N = frames * P
    order = work_order(prefix, N, L, block_m, segment_q_tiles)
    grid = (order[2] * n_active, B)  # (q-tile, head) work items, `_work_item`
    gluon = _gluon_mode(q, block_m, masked_percent)
    if gluon is not None:
        from .gluon_attention import launch_gluon

        with torch.cuda.device(q.device):
            if launch_gluon(qb, kb, vb, ob, head_rules, row_ptr, runs, active_heads, kv_len, cube_map, geometry,
                            block_m, block_n, scale * _LOG2E, permuted, order, grid, gluon):
                return
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    descs = None
    if _tma_enabled() and (_INTERPRET or torch.cuda.get_device_capability(q.device)[0] >= 9):
        descs = (_row_descriptor(kb, block_n), _row_descriptor(vb, block_n))
        descs = None if None in descs else descs
    work_bucket = (grid[0] * grid[1]).bit_length()
    has_desc = int(descs is not None)
    # space-major and cube-order heads read copies in their order by TMA; without them (or their
    # descriptors) they gather, and the copy slots carry the K/V descriptors again, unused
    copies = None
    if descs is not None and permuted is not None and permuted[0].numel():
        copies = _physical_order_copies(kb, vb, permuted[0], permuted[2], geometry, block_n)
    n_slots, slots = (permuted[0].numel(), permuted[1]) if copies else (0, head_rules)
    # 0: no cube-order heads reading copies (or the merged walk off), 1: tune both walks, 2: merged
    # only; a key of the autotuner, so a forced walk is never served a config tuned without it
    has_cube_copies = 0
    if copies and cube_map is not None:
        has_cube_copies = _tuned_choice("SPARSE_VDIT_MERGED_CUBE")
    paired_tiles = _tuned_choice("SPARSE_VDIT_PAIRED_TILES")
    args = (qb, kb, vb, ob, head_rules, row_ptr, runs, active_heads,
            kv_len if kv_len is not None else head_rules,
            cube_map if cube_map is not None else head_rules,
            *(descs or (kb, vb)), *(copies or descs or (kb, vb)), slots,
            qb.stride(0), qb.stride(1), qb.stride(2), kb.stride(0), kb.stride(1), kb.stride(2),
            vb.stride(0), vb.stride(1), vb.stride(2), ob.stride(0), ob.stride(1), ob.stride(2),
            n_active, *order, L, prefix, frames, width, P, N, 1.0 / frames, 1.0 / width, 1.0 / P,
            scale * _LOG2E, work_bucket, density_bucket, has_desc, *box_layouts(frames, height, width), n_slots,
            has_cube_copies, paired_tiles)
    kernel, options = _sparse_attention_fwd, {}
    tuned = None
    if _REUSE_TUNED[0]:  # the autotuner's key of this launch: its key values, then every arg's dtype
        key = (D, block_m, block_n, precision, work_bucket, density_bucket, has_desc, has_cube_copies, paired_tiles)
        tuned = _nearest_tuned(key + tuple(str(a.dtype) for a in args if hasattr(a, "dtype")))
    if tuned is not None:
        kernel, options = _sparse_attention_fwd.fn, tuned
    elif _INTERPRET:  # nothing to tune: one config, the call's load path, cube-order run walk and pairing
        kernel, options = _sparse_attention_fwd.fn, dict(USE_TMA=bool(has_desc), MERGED_CUBE=bool(has_cube_copies),
                                                          PAIRED=bool(has_desc and paired_tiles), num_warps=4,
                                                          num_stages=1)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        kernel[grid](*args, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, HAS_KV_LEN=kv_len is not None,
                     PRECISION=precision, **options)


@torch.library.custom_op("sparse_vdit::sparse_attention", mutates_args=())
def sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_rules: torch.Tensor,
                        row_ptr: torch.Tensor, runs: torch.Tensor, active_heads: torch.Tensor,
                        skip_heads: torch.Tensor, kv_len: Optional[torch.Tensor],
                        cube_map: Optional[torch.Tensor], geometry: list[int], block_m: int,
                        block_n: int, layout: str, scale: float, density_bucket: int = 0,
                        permuted_heads: Optional[torch.Tensor] = None,
                        permuted_slots: Optional[torch.Tensor] = None,
                        permuted_orders: Optional[torch.Tensor] = None,
                        segment_q_tiles: bool = True, masked_percent: int = 0) -> torch.Tensor:
    """Custom-op form of `launch_sparse_attention` returning a new contiguous output."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    permuted = None
    if permuted_heads is not None and permuted_slots is not None and permuted_orders is not None:
        permuted = (permuted_heads, permuted_slots, permuted_orders)
    launch_sparse_attention(q, k, v, out, head_rules, row_ptr, runs, active_heads, skip_heads, kv_len,
                            cube_map, geometry, block_m, block_n, layout, scale, density_bucket, permuted,
                            segment_q_tiles, masked_percent)
    return out


@sparse_attention_op.register_fake
def _sparse_attention_fake(q, k, v, head_rules, row_ptr, runs, active_heads, skip_heads, kv_len,
                           cube_map, geometry, block_m, block_n, layout, scale, density_bucket=0,
                           permuted_heads=None, permuted_slots=None, permuted_orders=None, segment_q_tiles=True,
                           masked_percent=0):
    return q.new_empty(q.shape)


def triton_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: KernelTables,
                            layout: str, kv_len: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Sparse attention through the custom op (inputs must already be validated)."""
    active, skip, permuted_heads, permuted_slots, permuted_orders = tables.launch_heads()
    # eager calls pass cube_map only to layers with cube-order heads and check it is there; under
    # torch.compile (the check is a host-side bool it cannot trace) the tables' map goes as it is
    cube_map = tables.cube_map
    if not torch.compiler.is_compiling():
        uses_cube = tables.uses_cube_order()
        if cube_map is None and uses_cube:
            raise ValueError("a head runs in cube order (ORDER 2) but the tables carry no cube_map")
        cube_map = cube_map if uses_cube else None
    return torch.ops.sparse_vdit.sparse_attention(
        q, k, v, tables.head_rules, tables.row_ptr, tables.runs, active, skip, kv_len, cube_map,
        [tables.prefix, tables.frames, tables.height, tables.width],
        tables.block_m, tables.block_n, layout, float(scale), tables.density_bucket,
        permuted_heads, permuted_slots, permuted_orders, tables.segment_q_tiles, tables.masked_percent)
