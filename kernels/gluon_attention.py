"""The sparse-attention kernel for Hopper (sm_90) in Gluon, on the Triton kernel's tables, rules and
masks (docs/DESIGN.md 5).

Triton 3.6 waits for each tile's QK wgmma right after issuing it, so the tensor cores idle during the
softmax. Here the waits are explicit: per k-tile j the QK of the next tile is issued (async wgmma)
before tile j's softmax and tile j's PV after it, with one wait per tile, and K/V tiles arrive by TMA
into a ring of STAGES shared slots, one mbarrier each. bench/gluon_dense.py measured this loop on
dense attention at 0.905x cuDNN (d = 128, 128-key tiles, 3 slots) and 0.976-0.997x (d = 64, 64-key
tiles, 3-6 slots), against 0.83-0.90x for the Triton kernel (bench/results/attention.md, run L).

A program walks its q-tile's runs in two software-pipelined loops, the full tiles first, then the
partial and cut ones (kv_len, the sequence end) with the rule's mask (`_masked_scores`, shared with
the Triton kernel) between their QK and softmax: a load walker keeps STAGES tiles in flight ahead of
the compute walker across runs, so the pipeline drains twice per q-tile, not twice per run; only
full tiles overlap the next QK with the softmax (masked tiles are few, and their mask needs the
registers). Each kind's tile count and first tile come from a loop over the q-tile's runs
(`_walk_start`) or, with SPARSE_VDIT_GLUON_FAST_START=1 (not yet timed), from vector loads of them
(`_scan_runs`), with Q stored to shared memory after the first K/V loads are issued. Every head
reads K/V by TMA: frame-major heads from the inputs, space-major and cube-order heads from their
copies in physical order (`_physical_order_copies`). Warp-specialized (WARP_SPEC, mode "ws"; the
prototype's schedule 2, 0.977x cuDNN at d = 128), one loader warp walks the runs and issues every TMA
load, each once the 8 consumer warps have freed its ring slot, so the consumers' full-tile loop holds
no walker at all. Gluon does not run under TRITON_INTERPRET; on the CPU it compiles for sm_90
(`compile_sm90`), on the GPU tests/gpu checks it against the reference.
"""

from __future__ import annotations

import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from .triton_attention import (_NEG_BIG, _masked_scores, _program_setup, _query_box, _row_view, _to_logical)

_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
SMEM_BUDGET = 227 * 1024 - 2048  # of the 227 KB a block may use on sm_90: Q and the K/V ring (barriers: the rest)
TWO_CTA_BUDGET = 228 * 1024 // 2 - 1024 - 128  # half an SM's 228 KB, less the 1 KB a CTA reserves and barriers
MAX_STAGES = 6
RUN_CHUNK = gl.constexpr(4)  # runs `_scan_runs` reads a load (most q-tiles of bands and stripes have 3-5);
# with 8 or 16 the capped kernel's masked loop spilled 172 or 169 instructions, not 64


def stages_for(block_m: int, block_n: int, head_dim: int, elem_bytes: int = 2, budget: int = SMEM_BUDGET) -> int:
    """K/V ring slots that fit `budget` bytes of shared memory next to the Q tile (at most MAX_STAGES)."""
    free = budget - block_m * head_dim * elem_bytes
    return max(2, min(MAX_STAGES, free // (2 * block_n * head_dim * elem_bytes)))


@gluon.jit
def _load_tile(desc_k, desc_v, k_s, v_s, bars, t, kt, from_copy, k_row, k_col, v_row, v_col, c_row,
               BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads of k-tile `kt`'s K and V into ring slot t % STAGES, signalling its mbarrier: from the
    inputs' 2D row views at (row, column) origins, or from the head's copies (`from_copy`) at row c_row."""
    stage = t % STAGES
    bar = bars.index(stage)
    mbarrier.expect(bar, 2 * desc_k[0].block_type.nbytes)
    if from_copy:
        tma.async_copy_global_to_shared(desc_k[1], [c_row + kt * BLOCK_N, 0], bar, k_s.index(stage))
        tma.async_copy_global_to_shared(desc_v[1], [c_row + kt * BLOCK_N, 0], bar, v_s.index(stage))
    else:
        tma.async_copy_global_to_shared(desc_k[0], [k_row + kt * BLOCK_N, k_col], bar, k_s.index(stage))
        tma.async_copy_global_to_shared(desc_v[0], [v_row + kt * BLOCK_N, v_col], bar, v_s.index(stage))


@gluon.jit
def _tile_softmax(s, kt, m_i, l_i, mask_args, qk_scale, MASKED: gl.constexpr, BLOCK_N: gl.constexpr,
                  p_layout: gl.constexpr, dtype: gl.constexpr):
    """One tile's online-softmax statistics, MASKED: the rule's mask first (the query box rebuilt from
    the rows `lq`, not kept live across the loop): (P as the PV wgmma's register operand, alpha, new
    max, new sum)."""
    if MASKED:
        (rule, lq, layout_args, order, CUBE_MAP, prefix, F, P, W, N, inv_F, inv_P, inv_W, kv_end) = mask_args
        box = _query_box(rule, lq, prefix, F, W, P, N, inv_P, inv_W, *layout_args)
        cols = kt * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
        lk = _to_logical(cols, order, prefix, F, P, N, inv_F, CUBE_MAP)
        s = _masked_scores(s, box, lk, prefix, P, W, N, inv_P, inv_W, kv_end)
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return gl.convert_layout(p.to(dtype), p_layout), alpha, m_new, l_i


@gluon.jit
def _kind_bounds(RUNS, r, run_hi, first_cut_tile, MASKED: gl.constexpr, wanted=True):
    """[a, b): the tiles of run r (none past run_hi, none unless `wanted`: the loads are predicated off)
    of one kind: full ones (before the first cut tile of a full run) or, MASKED, the others."""
    some = (r < run_hi) & wanted
    lo = gl.load(RUNS + 3 * r, mask=some, other=0)
    hi = gl.load(RUNS + 3 * r + 1, mask=some, other=0)
    full = gl.load(RUNS + 3 * r + 2, mask=some, other=0)
    cut = gl.minimum(gl.maximum(first_cut_tile, lo), hi)
    if MASKED:
        a = gl.where(full != 0, cut, lo)
        b = hi
    else:
        a = lo
        b = gl.where(full != 0, cut, lo)
    return a, b


@gluon.jit
def _seek(RUNS, r, run_hi, first_cut_tile, MASKED: gl.constexpr, wanted=True):
    """The first tile of the kind in runs r, r + 1, ... when `wanted` (else nothing is read): (run,
    tile, that run's end of the kind); past the last run, r = run_hi."""
    kt, b = _kind_bounds(RUNS, r, run_hi, first_cut_tile, MASKED, wanted)
    while wanted & (kt >= b) & (r < run_hi):
        r += 1
        kt, b = _kind_bounds(RUNS, r, run_hi, first_cut_tile, MASKED)
    return r, kt, b


@gluon.jit
def _advance(RUNS, r, kt, b, run_hi, first_cut_tile, MASKED: gl.constexpr):
    """The next tile of the kind after tile kt of run r (whose end of the kind is b). Branch-free (the
    next runs are read, predicated, only when leaving a run, and selected): with an `if` around the
    seek ptxas serialized every wgmma of the kernel (C7514)."""
    kt += 1
    step = kt >= b
    r2, kt2, b2 = _seek(RUNS, r + 1, run_hi, first_cut_tile, MASKED, step)
    return gl.where(step, r2, r), gl.where(step, kt2, kt), gl.where(step, b2, b)


@gluon.jit
def _walk_start(RUNS, run_lo, run_hi, first_cut_tile, MASKED: gl.constexpr, wanted=True):
    """(tiles of the kind, its first tile as `_seek` gives it: (run, tile, that run's end of the kind)) of
    the q-tile's runs, one run at a time: a chain of dependent loads per run, then `_seek`'s."""
    n = 0
    for r in range(run_lo, run_hi):
        a, b = _kind_bounds(RUNS, r, run_hi, first_cut_tile, MASKED)
        n += b - a
    return n, _seek(RUNS, run_lo, run_hi, first_cut_tile, MASKED, wanted)


@gluon.jit
def _scan_runs(RUNS, run_lo, run_hi, first_cut_tile, MASKED: gl.constexpr, CHUNK: gl.constexpr):
    """`_walk_start` from vector loads of CHUNK runs (one round trip for most q-tiles, against one a run
    and `_seek`'s): the kind's tiles summed, its first run picked by a min over the chunk."""
    # every thread reads the whole chunk: sums and mins without shuffles, so ptxas can keep the results
    # (ring slots and phases derive from them) in uniform registers
    layout: gl.constexpr = gl.BlockedLayout([CHUNK], [32], [gl.num_warps()], [0])
    none: gl.constexpr = 1 << 30
    n = run_lo * 0
    first = run_hi + n  # past the last run, as `_seek` leaves it when the kind has no tile
    kt = n
    b = n
    for r0 in range(run_lo, run_hi, CHUNK):
        r = r0 + gl.arange(0, CHUNK, layout=layout)
        some = r < run_hi
        lo = gl.load(RUNS + 3 * r, mask=some, other=0)
        hi = gl.load(RUNS + 3 * r + 1, mask=some, other=0)
        cut = gl.where(gl.load(RUNS + 3 * r + 2, mask=some, other=0) != 0,
                       gl.minimum(gl.maximum(first_cut_tile, lo), hi), lo)  # full tiles [lo, cut), masked [cut, hi)
        if MASKED:
            lo, hi = cut, hi
        else:
            lo, hi = lo, cut
        n += gl.sum(hi - lo, axis=0)
        here = gl.min(gl.where(hi > lo, r, none), axis=0)
        new = (first == run_hi) & (here < none)
        kt = gl.where(new, gl.sum(gl.where(r == here, lo, 0), axis=0), kt)
        b = gl.where(new, gl.sum(gl.where(r == here, hi, 0), axis=0), b)
        first = gl.where(new, here, first)
    return n, (first, kt, b)


@gluon.jit
def _release(free, t, STAGES: gl.constexpr):
    """Warp-specialized: this thread is done with ring use t's slot (the wgmma that read it retired): its
    own arrival on the slot's "free" mbarrier (cp.async.mbarrier.arrive.noinc; Gluon's mbarrier.arrive
    is one thread's, after a bar.sync of the partition)."""
    async_copy.mbarrier_arrive(free.index(t % STAGES), increment_count=False)


@gluon.jit
def _attend_kind(m_i, l_i, acc, t0, ring, walk, kind, mask_args, qk_scale, MASKED: gl.constexpr,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr,
                 o_layout: gl.constexpr, p_layout: gl.constexpr, dtype: gl.constexpr, WARP_SPEC: gl.constexpr,
                 q_late=0, STORE_Q: gl.constexpr = False):
    """Fold the q-tile's tiles of one kind (full, or MASKED: partial and cut; `kind` = (their count, the
    first one as `_seek` gives it)) into the online softmax, in one software-pipelined loop over all its
    runs (STORE_Q: Q's rows `q_late` go to shared memory once the first K/V loads are on their way, so
    the two latencies overlap): a load walker keeps STAGES tiles in flight; for full
    tiles, tile j+1's QK is issued before tile j's softmax and its PV after it, one wait a tile; masked
    tiles go one at a time (QK, mask and softmax, PV), since the mask's registers next to a second
    score tile in flight made the 128-register cap spill 263 instructions (66 this way). Ring use number t0
    on (slot t % STAGES, phase t // STAGES) continues the previous kind's. Two loops, not one with a
    branch: the inlined mask code (and its loop invariants) took 221 registers and 2,249 instructions
    a tile in the one loop, the full tiles' loop alone 127 and 366. WARP_SPEC: the loads are the loader
    partition's (`_load_tiles`); each slot is handed back on its "free" mbarrier once the wgmma wait that
    retires its last reader has passed, and full tiles leave PV(j) running into softmax(j + 1) (the
    consumers have 240 registers; the prototype gained 7% at d = 128 so), freeing tile j's slot a tile
    later. Returns the state and the ring uses."""
    (q_s, k_s, v_s, bars, free, descs_k, descs_v, from_copy, k_row, k_col, v_row, v_col, c_row) = ring
    (RUNS, run_lo, run_hi, first_cut_tile) = walk
    n = kind[0]  # the tiles of the kind
    lr, lkt, lb = kind[1]  # the load walker's start
    if not WARP_SPEC:
        for t in gl.static_range(STAGES):
            if t < n:
                _load_tile(descs_k, descs_v, k_s, v_s, bars, t0 + t, lkt, from_copy, k_row, k_col, v_row, v_col,
                           c_row, BLOCK_N, STAGES)
                lr, lkt, lb = _advance(RUNS, lr, lkt, lb, run_hi, first_cut_tile, MASKED)
    if STORE_Q:
        q_s.store(q_late)
        hopper.fence_async_shared()  # before the QK wgmmas (the async proxy) read it
    if n > 0:
        cr, ckt, cb = kind[1]  # the compute walker
        # warp-specialized full tiles leave PV(j) running into softmax(j + 1) (the prototype's schedule 2)
        OVERLAP_PV: gl.constexpr = WARP_SPEC and not MASKED
        mbarrier.wait(bars.index(t0 % STAGES), (t0 // STAGES) & 1)
        s = hopper.warpgroup_mma(q_s, k_s.index(t0 % STAGES).permute((1, 0)),
                                 gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout))
        if OVERLAP_PV:  # acc is carried between iterations as the token of an unwaited PV
            acc = hopper.warpgroup_mma_init(acc)
            p_prev = gl.zeros([BLOCK_M, BLOCK_N], dtype, p_layout)  # PV(j-1)'s register operand
        for j in range(n - 1):  # full tiles: tile j+1's QK runs during tile j's softmax
            nxt = t0 + j + 1
            if not MASKED:
                mbarrier.wait(bars.index(nxt % STAGES), (nxt // STAGES) & 1)
                s_next = hopper.warpgroup_mma(q_s, k_s.index(nxt % STAGES).permute((1, 0)),
                                              gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), is_async=True)
            p, alpha, m_i, l_i = _tile_softmax(s, ckt, m_i, l_i, mask_args, qk_scale, MASKED, BLOCK_N, p_layout,
                                               dtype)
            if OVERLAP_PV:  # one wait(0) retires QK(j+1) and PV(j-1), whose slot is then free
                s, acc, p_prev = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[s_next, acc, p_prev])
                if j > 0:
                    _release(free, nxt - 2, STAGES)
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            acc = hopper.warpgroup_mma(p, v_s.index((t0 + j) % STAGES), acc, is_async=True)
            if OVERLAP_PV:
                p_prev = p  # live until the next wait
            elif MASKED:  # one tile at a time: a second score tile in flight would not fit next to the mask's
                acc = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[acc])
                mbarrier.wait(bars.index(nxt % STAGES), (nxt // STAGES) & 1)
                s = hopper.warpgroup_mma(q_s, k_s.index(nxt % STAGES).permute((1, 0)),
                                         gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout))
            else:
                s, acc = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[s_next, acc])
            if WARP_SPEC and not OVERLAP_PV:  # tile j's slot is free again
                _release(free, t0 + j, STAGES)
            elif not WARP_SPEC and j + STAGES < n:
                _load_tile(descs_k, descs_v, k_s, v_s, bars, t0 + j + STAGES, lkt, from_copy, k_row, k_col, v_row,
                           v_col, c_row, BLOCK_N, STAGES)
                lr, lkt, lb = _advance(RUNS, lr, lkt, lb, run_hi, first_cut_tile, MASKED)
            if MASKED:  # only the mask needs the tile being computed
                cr, ckt, cb = _advance(RUNS, cr, ckt, cb, run_hi, first_cut_tile, MASKED)
        p, alpha, m_i, l_i = _tile_softmax(s, ckt, m_i, l_i, mask_args, qk_scale, MASKED, BLOCK_N, p_layout, dtype)
        if OVERLAP_PV:
            acc, p_prev = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[acc, p_prev])
            if n > 1:
                _release(free, t0 + n - 2, STAGES)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        acc = hopper.warpgroup_mma(p, v_s.index((t0 + n - 1) % STAGES), acc, is_async=True)
        acc = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        if WARP_SPEC:
            _release(free, t0 + n - 1, STAGES)
    return m_i, l_i, acc, t0 + n


@gluon.jit
def _load_tiles(RUNS, run_lo, run_hi, first_cut_tile, k_s, v_s, bars, free, desc_k, desc_v, desc_ks, desc_vs,
                from_copy, k_row, k_col, v_row, v_col, c_row, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The loader partition (one warp) of the warp-specialized kernel: every tile of the q-tile in the
    consumers' order (full tiles of all runs, then the masked ones), each into the next ring slot once
    the consumers have freed it (a slot's k-th refill waits for the k-th completion of its free
    mbarrier; the first fill waits for parity 1, which a fresh mbarrier passes)."""
    t = 0
    for kind in gl.static_range(2):
        for r in range(run_lo, run_hi):
            a, b = _kind_bounds(RUNS, r, run_hi, first_cut_tile, kind == 1)
            for kt in range(a, b):
                mbarrier.wait(free.index(t % STAGES), ((t // STAGES) & 1) ^ 1)
                _load_tile((desc_k, desc_ks), (desc_v, desc_vs), k_s, v_s, bars, t, kt, from_copy, k_row, k_col,
                           v_row, v_col, c_row, BLOCK_N, STAGES)
                t += 1


@triton.constexpr_function
def _mma_layout(warps, columns):
    """The wgmma accumulator layout of [BLOCK_M, columns] tiles, one warpgroup a 64-row slab."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, columns, 16])


@gluon.jit
def _consume(m_i, l_i, acc, ring, walk, mask_args, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
             HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, WARP_SPEC: gl.constexpr, FAST_START: gl.constexpr,
             q_late=0):
    """Both kinds of tiles into the online softmax, full ones first, each kind's count and first tile
    found by `_walk_start` or, FAST_START, `_scan_runs`, which also stores Q's rows `q_late` to shared
    memory after the first K/V loads when not warp-specialized: (running sum, accumulator)."""
    s_layout: gl.constexpr = _mma_layout(gl.num_warps(), BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(gl.num_warps(), HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dtype: gl.constexpr = ring[0].dtype
    (RUNS, run_lo, run_hi, first_cut_tile) = walk
    if FAST_START:
        full = _scan_runs(RUNS, run_lo, run_hi, first_cut_tile, False, RUN_CHUNK)
    else:  # a warp-specialized full kind needs no load walker (the loader partition loads)
        full = _walk_start(RUNS, run_lo, run_hi, first_cut_tile, False, not WARP_SPEC)
    m_i, l_i, acc, used = _attend_kind(m_i, l_i, acc, 0, ring, walk, full, mask_args, qk_scale, False, BLOCK_M,
                                       BLOCK_N, STAGES, s_layout, o_layout, p_layout, dtype, WARP_SPEC, q_late,
                                       FAST_START and not WARP_SPEC)
    if FAST_START:  # (read after the full tiles, so nothing of it is live in their loop)
        masked = _scan_runs(RUNS, run_lo, run_hi, first_cut_tile, True, RUN_CHUNK)
    else:
        masked = _walk_start(RUNS, run_lo, run_hi, first_cut_tile, True)
    m_i, l_i, acc, used = _attend_kind(m_i, l_i, acc, used, ring, walk, masked, mask_args, qk_scale, True, BLOCK_M,
                                       BLOCK_N, STAGES, s_layout, o_layout, p_layout, dtype, WARP_SPEC)
    return l_i, acc


# the loader warp's registers (setmaxnreg.dec, the least there is). The default partition's count is not
# an argument: Triton gives the consumer warps what is left of the 65,536 registers of 3 warpgroups (the
# loader's warp takes one), setmaxnreg.inc 240 = (65,536 / 128 - 24) / 2 down to a multiple of 8
LOADER_REGS = gl.constexpr(24)


@gluon.jit(do_not_specialize=["n_active", "q_cut1", "q_cut2", "n_q", "n_lead", "trail_start", "L", "prefix", "F",
                              "W", "P", "N", "n_slots"])
def gluon_sparse_fwd(
    Q, O, RULES, ROW_PTR, RUNS, ACTIVE, KV_LEN, CUBE_MAP, DESC_K, DESC_V, DESC_KS, DESC_VS, SLOT,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl, stride_ob, stride_oh, stride_ol,
    n_active, q_cut1, q_cut2, n_q, n_lead, trail_start,
    L, prefix, F, W, P, N, inv_F, inv_W, inv_P, qk_scale,
    win_y_shift, win_f_shift, win_guard, md_f_shift, md_guard, n_slots,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HAS_KV_LEN: gl.constexpr,
    STAGES: gl.constexpr, WARP_SPEC: gl.constexpr, FAST_START: gl.constexpr,
):
    nw: gl.constexpr = gl.num_warps()
    dtype: gl.constexpr = Q.dtype.element_ty
    s_layout: gl.constexpr = _mma_layout(nw, BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(nw, HEAD_DIM)
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [nw, 1], [1, 0])
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    (pid_m, b, h, rule, order, row_base, kv_end, first_cut_tile, m_start, m_end) = _program_setup(
        RULES, ACTIVE, KV_LEN, n_active, q_cut1, q_cut2, n_q, n_lead, trail_start, L, prefix, N, P, BLOCK_M,
        BLOCK_N, HAS_KV_LEN)

    # Q rows (gathered through the head's order) into shared memory, once
    rows = m_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
    lq = _to_logical(gl.where(rows < m_end, rows, m_start), order, prefix, F, P, N, inv_F, CUBE_MAP)
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld_layout))
    q = gl.load(Q + b * stride_qb + h * stride_qh + lq.to(gl.int64)[:, None] * stride_ql + cols[None, :],
                mask=(rows < m_end)[:, None], other=0.0)
    if FAST_START and not WARP_SPEC:  # stored after the first K/V loads (`_attend_kind`)
        q_s = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], DESC_K.layout)
    else:
        q_s = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], DESC_K.layout, q)
    k_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], DESC_K.layout)
    v_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], DESC_V.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [STAGES if WARP_SPEC else 1, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
        if WARP_SPEC:  # a slot is free once every consumer thread has arrived
            mbarrier.init(free.index(i), count=nw * 32)
    hopper.fence_async_shared()  # Q's stores and the initialised barriers, before the async proxy uses them

    rows_s = m_start + gl.arange(0, BLOCK_M, layout=row_layout)
    lq_s = _to_logical(gl.where(rows_s < m_end, rows_s, m_start), order, prefix, F, P, N, inv_F, CUBE_MAP)
    layout_args = (win_y_shift, win_f_shift, win_guard, md_f_shift, md_guard)

    # where this head's token 0 is: (row, column) of the inputs' 2D views, or its copy's first row
    k_off = b * stride_kb + h * stride_kh
    v_off = b * stride_vb + h * stride_vh
    k_row, v_row = (k_off // stride_kl).to(gl.int32), (v_off // stride_vl).to(gl.int32)
    k_col, v_col = (k_off % stride_kl).to(gl.int32), (v_off % stride_vl).to(gl.int32)
    from_copy = (order != 0) & (n_slots > 0)
    c_row = ((b * n_slots + gl.load(SLOT + h, mask=from_copy, other=0)) * L).to(gl.int32)
    descs_k = (DESC_K, DESC_KS)
    descs_v = (DESC_V, DESC_VS)

    run_lo = gl.load(ROW_PTR + row_base + pid_m)
    run_hi = gl.load(ROW_PTR + row_base + pid_m + 1)
    m_i = gl.full([BLOCK_M], _NEG_BIG, gl.float32, row_layout)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    ring = (q_s, k_s, v_s, bars, free, descs_k, descs_v, from_copy, k_row, k_col, v_row, v_col, c_row)
    walk = (RUNS, run_lo, run_hi, first_cut_tile)
    mask_args = (rule, lq_s, layout_args, order, CUBE_MAP, prefix, F, P, W, N, inv_F, inv_P, inv_W, kv_end)
    if WARP_SPEC:  # these warps consume (the default partition: a wgmma in a worker serializes them all)
        # a full tile's slot is freed one tile late (PV left in flight), and the consumers wait for tile
        # j + 1 before freeing tile j - 1: with 2 slots the loader would wait for them forever
        gl.static_assert(STAGES >= 3, "the warp-specialized kernel needs 3 K/V slots or more")
        l_i, acc = gl.warp_specialize([
            (_consume, (m_i, l_i, acc, ring, walk, mask_args, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                        WARP_SPEC, FAST_START)),
            (_load_tiles, (RUNS, run_lo, run_hi, first_cut_tile, k_s, v_s, bars, free, DESC_K, DESC_V, DESC_KS,
                           DESC_VS, from_copy, k_row, k_col, v_row, v_col, c_row, BLOCK_N, STAGES)),
        ], [1], [LOADER_REGS])
        # (the free mbarriers are not invalidated: their last arrivals are asynchronous and nobody waits)
    else:
        l_i, acc = _consume(m_i, l_i, acc, ring, walk, mask_args, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                            WARP_SPEC, FAST_START, q)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    out = (acc / gl.where(l_o > 0, l_o, 1.0)[:, None]).to(dtype)
    rows_o = m_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    lq_o = gl.convert_layout(lq_s, gl.SliceLayout(1, o_layout))
    cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    gl.store(O + b * stride_ob + h * stride_oh + lq_o.to(gl.int64)[:, None] * stride_ol + cols_o[None, :], out,
             mask=(rows_o < m_end)[:, None])


def row_descriptor(x, block_rows: int):
    """A Gluon TMA descriptor viewing x ([B, H, L, D], last dim contiguous) as rows of its token stride
    (`triton_attention._row_descriptor`'s view), or None when x's strides or alignment don't allow it."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    view = _row_view(x)
    if view is None:
        return None
    rows, row_stride = view
    D = x.shape[-1]
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, D], _GL_DTYPES[x.dtype])
    return TensorDescriptor(x, [rows, row_stride], [row_stride, 1], [block_rows, D], layout)


def compile_sm90(head_dim: int = 128, block_m: int = 128, block_n: int = 128, stages: int | None = None,
                 warps: int = 8, kv_len: bool = True, maxnreg: int | None = None, warp_spec: bool = False,
                 fast_start: bool = False):
    """The sm_90 CompiledKernel of `gluon_sparse_fwd` (bf16), built on the CPU (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    stages = stages or stages_for(block_m, block_n, head_dim)
    desc = mangle_type(row_descriptor(torch.empty(1, 1, 1024, head_dim, dtype=torch.bfloat16), block_n))
    fn = gluon_sparse_fwd
    const = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, HAS_KV_LEN=kv_len, STAGES=stages,
                 WARP_SPEC=warp_spec, FAST_START=fast_start)
    signature = {}
    for name in fn.arg_names:
        if name in const:
            signature[name] = "constexpr"
        elif name in ("Q", "O"):
            signature[name] = "*bf16"
        elif name.startswith("DESC_"):
            signature[name] = desc
        elif name in ("RULES", "ROW_PTR", "RUNS", "ACTIVE", "KV_LEN", "CUBE_MAP", "SLOT"):
            signature[name] = "*i32"
        elif name in ("inv_F", "inv_W", "inv_P", "qk_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    aligned = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
               if signature[n].startswith("*") or n.startswith("stride_")}
    source = GluonASTSource(fn=fn, signature=signature, attrs=aligned,
                            constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "maxnreg": maxnreg})


def launch_gluon(qb, kb, vb, ob, head_rules, row_ptr, runs, active_heads, kv_len, cube_map, geometry: list[int],
                 block_m: int, block_n: int, qk_scale: float, permuted, work: tuple[int, ...], grid,
                 mode: str) -> bool:
    """Launch `gluon_sparse_fwd` on [B, H, L, D] views (`triton_attention.launch_sparse_attention`'s
    arguments; `work` from `work_order`, qk_scale including log2 e; `mode` as `_occupancy` reads it);
    False, launching nothing, when a K/V view or a permuted head's copy gets no TMA descriptor (the
    Triton kernel then gathers)."""
    from .triton_attention import _physical_order_copies, box_layouts

    descs = (row_descriptor(kb, block_n), row_descriptor(vb, block_n))
    if None in descs:
        return False
    copies, n_slots, slots = None, 0, head_rules
    if permuted is not None and permuted[0].numel():
        copies = _physical_order_copies(kb, vb, permuted[0], permuted[2], geometry, block_n, row_descriptor)
        if copies is None:
            return False
        n_slots, slots = permuted[0].numel(), permuted[1]
    prefix, frames, height, width = geometry
    B, _, L, D = qb.shape
    P = height * width
    gluon_sparse_fwd[grid](
        qb, ob, head_rules, row_ptr, runs, active_heads, kv_len if kv_len is not None else head_rules,
        cube_map if cube_map is not None else head_rules, *descs, *(copies or descs), slots,
        qb.stride(0), qb.stride(1), qb.stride(2), kb.stride(0), kb.stride(1), kb.stride(2),
        vb.stride(0), vb.stride(1), vb.stride(2), ob.stride(0), ob.stride(1), ob.stride(2),
        active_heads.numel(), *work, L, prefix, frames, width, P, frames * P, 1.0 / frames, 1.0 / width, 1.0 / P,
        qk_scale, *box_layouts(frames, height, width), n_slots,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, HAS_KV_LEN=kv_len is not None,
        FAST_START=os.environ.get("SPARSE_VDIT_GLUON_FAST_START", "0") == "1", num_warps=8,
        **_occupancy(block_m, block_n, D, qb.element_size(), mode))
    return True


def _occupancy(block_m: int, block_n: int, head_dim: int, elem_bytes: int, mode: str) -> dict:
    """STAGES, register cap and warp specialization of a mode: "1", as many K/V slots as a block may
    hold (the kernel takes 217 registers, for its masked loop: one CTA an SM); "r128", at most 128
    registers a thread and half an SM's shared memory, so two CTAs share an SM (attention run M: 28%
    faster than "1" on CogVideoX1.5's dense layer at d = 64, 9% slower on Wan2.1-14B's at d = 128);
    "ws", "1" with one loader warp feeding the 8 consumer warps (`_load_tiles`; run N: 2-7% faster
    than the Triton kernel at d = 128, 3-13% slower than "r128" at d = 64; it needs 3 slots, which
    every head_dim and tile shape of `preferred_tiles` leaves room for)."""
    if mode == "r128":
        return {"STAGES": stages_for(block_m, block_n, head_dim, elem_bytes, TWO_CTA_BUDGET), "maxnreg": 128,
                "WARP_SPEC": False}
    return {"STAGES": stages_for(block_m, block_n, head_dim, elem_bytes), "WARP_SPEC": mode == "ws"}
