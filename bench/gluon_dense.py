"""A Gluon prototype of our full-tile loop with FA3's overlap, before it goes into the engine.

    python3 -m sparse_vdit.bench.gluon_dense [--head-dim 128] [--out FILE]

Triton 3.6 waits for each tile's QK wgmma right after issuing it, so the tensor cores idle during
the softmax (bench/results/attention.md, after run J). In Gluon the waits are ours. It is dense
attention ([B, H, L, D] bf16, full tiles unmasked, the last tile masked at L), i.e. the loop our
sparse kernel runs on full tiles, in BLOCK_N-key tiles (128 or 64) whose K/V arrive by TMA into a
ring of STAGES shared slots. Per tile j, SCHEDULE 0 issues QK(j+1) (async wgmma), runs softmax(j),
issues PV(j) and waits for both (one mbarrier a slot). SCHEDULE 1 leaves PV(j) running into
softmax(j+1): QK(j+1) is issued, softmax(j) runs while QK(j+1) and PV(j-1) are on the tensor cores,
one wait(0) retires both, acc is rescaled and PV(j) issued unwaited (K and V slots have their own
mbarriers: a K slot frees when its QK is done, a V slot when its PV is). A wait(1) that leaves
QK(j+1) running while acc is rescaled makes ptxas serialize every wgmma of the kernel (C7514:
accumulator registers read between a wgmma and its wait), so the one wait is wait(0).

Schedules 0 and 1 issue the ring's TMA refills from the consumer warps, and Triton's shared-memory
barrier pass puts a bar.sync of the CTA before the loop's first mbarrier wait and before each expect
and TMA load (4 and 5 BAR.SYNC a k-tile), which keeps the two warpgroups in lockstep. SCHEDULE 2 is
FA3's warp specialization, gl.warp_specialize([(consumer, args), (loader, args)], worker_num_warps=[1],
worker_num_regs=[24]): the kernel's 8 warps (the default partition, 2 warpgroups of 64 rows) run
schedule 1's tiles (the same helper) and, after the wgmma wait that retires a slot's last reader,
every consumer thread arrives on the slot's "free" mbarrier (count 256); one loader warp (setmaxnreg
24, the consumers get the rest, 240) waits on a slot's free mbarrier, then TMA-loads Q, K(t+1) and
V(t) into it, signalling the slot's "ready" mbarrier. What Triton 3.6 allows:
- the arrivals are cp.async.mbarrier.arrive.noinc, each thread's own: Gluon's mbarrier.arrive is one
  thread's, after a bar.sync of the whole partition;
- one bar.sync of the consumer partition (256 threads, not the loader) stays in the k-tile loop: the
  barrier pass puts one between two waits, or two arrivals, on the same mbarrier array in successive
  iterations (it cannot tell that the phases order them), in a partition of more than one warp;
- consumer warpgroups as partitions of their own (no shared bar.sync) do not work: a wgmma in a worker
  partition makes ptxas serialize every wgmma of the kernel (C7512, "insufficient register
  resources", at any worker register count), so the consumers are the default partition.

On a GPU (sm_90) it checks GPU_VARIANTS (the best of schedules 0 and 1 at each head dim, and
schedule 2) against cuDNN SDPA at an odd length and at Wan2.1-14B 720p's and CogVideoX1.5 768p's
shapes, and times them, a row at a time; on the CPU (no GPU) it compiles every (block_n, stages,
schedule) whose shared memory fits for sm_90 at --head-dim and prints registers, spills, shared
memory, the BAR.SYNC and the instruction order of the k-tile loop (and of schedule 2's loader loop).
Gluon does not run under TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import itertools
import math
import re

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from ..kernels.gluon_attention import LOADER_REGS, _release  # the product kernel's, shared
from .kernel_sass import disassemble, innermost_loops, instruction_name, kernel_loops, loop_table

LOG2E = 1.4426950408889634


@gluon.jit
def _softmax(s, m_i, l_i, qk_scale, col0, L, MASKED: gl.constexpr, p_layout: gl.constexpr):
    """One tile's online-softmax statistics: (P as PV's bf16 register operand, alpha, new max, new sum)."""
    if MASKED:
        cols = col0 + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s.type.layout))
        s = gl.where((cols < L)[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return gl.convert_layout(p.to(gl.bfloat16), p_layout), alpha, m_new, l_i


@gluon.jit
def _pv(p, alpha, acc, v_s, tile, STAGES: gl.constexpr, o_layout: gl.constexpr):
    """acc * alpha, then tile `tile`'s PV wgmma (its V landed), issued async and returned unwaited."""
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    return hopper.warpgroup_mma(p, v_s.index(tile % STAGES), acc, is_async=True)


@gluon.jit
def _wait_tile(bars, tile, STAGES: gl.constexpr):
    """Wait for the TMA load of tile `tile` into its ring slot."""
    mbarrier.wait(bars.index(tile % STAGES), (tile // STAGES) & 1)


@gluon.jit
def _qk(q_s, k_s, k_bars, tile, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        s_layout: gl.constexpr, IS_ASYNC: gl.constexpr):
    """Tile `tile`'s QK wgmma once its K has landed (a token to wait on when IS_ASYNC)."""
    _wait_tile(k_bars, tile, STAGES)
    zeros = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    return hopper.warpgroup_mma(q_s, k_s.index(tile % STAGES).permute((1, 0)), zeros, is_async=IS_ASYNC)


@gluon.jit
def _load(desc, ring, bars, tile, n_tiles, row0, STAGES: gl.constexpr):
    """TMA load of K or V tile `tile` (when there is one) into its ring slot, signalling that slot's mbarrier."""
    if tile < n_tiles:
        stage = tile % STAGES
        mbarrier.expect(bars.index(stage), desc.block_type.nbytes)
        tma.async_copy_global_to_shared(desc, [row0 + tile * desc.block_type.shape[0], 0], bars.index(stage),
                                        ring.index(stage))


@gluon.jit
def _load_kv(desc_k, desc_v, k_s, v_s, bars, tile, n_tiles, row0, STAGES: gl.constexpr):
    """TMA loads of K and V tile `tile` (when there is one) into their ring slots, signalling one mbarrier."""
    if tile < n_tiles:
        stage = tile % STAGES
        mbarrier.expect(bars.index(stage), 2 * desc_k.block_type.nbytes)
        row = row0 + tile * desc_k.block_type.shape[0]
        tma.async_copy_global_to_shared(desc_k, [row, 0], bars.index(stage), k_s.index(stage))
        tma.async_copy_global_to_shared(desc_v, [row, 0], bars.index(stage), v_s.index(stage))


@gluon.jit
def _produce(desc, ring, bars, free_bars, tile, n_tiles, row0, STAGES: gl.constexpr):
    """SCHEDULE 2's loader: tile `tile`'s TMA load (when there is one) once the consumers have freed its slot."""
    if tile < n_tiles:
        # the slot's k-th refill waits for the k-th completion of its free mbarrier; the first fill waits for
        # parity 1, which a freshly initialised mbarrier passes
        mbarrier.wait(free_bars.index(tile % STAGES), ((tile // STAGES) & 1) ^ 1)
        _load(desc, ring, bars, tile, n_tiles, row0, STAGES)


@gluon.jit
def _loader(desc_q, desc_k, desc_v, q_s, k_s, v_s, q_bar, k_bars, v_bars, k_free, v_free, row0, m0, n_tiles,
            STAGES: gl.constexpr):
    """SCHEDULE 2's loader partition (one warp): Q, K(0), then K(t + 1) and V(t) a step, the order of their use."""
    mbarrier.expect(q_bar, desc_q.block_type.nbytes)
    tma.async_copy_global_to_shared(desc_q, [row0 + m0, 0], q_bar, q_s)
    _produce(desc_k, k_s, k_bars, k_free, 0, n_tiles, row0, STAGES)
    for t in range(n_tiles):
        _produce(desc_k, k_s, k_bars, k_free, t + 1, n_tiles, row0, STAGES)
        _produce(desc_v, v_s, v_bars, v_free, t, n_tiles, row0, STAGES)


@gluon.jit
def _overlapped_tile(q_s, k_s, v_s, k_bars, v_bars, j, s, acc, p_prev, m_i, l_i, qk_scale, L, BLOCK_N: gl.constexpr,
                     STAGES: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr):
    """Tile j of SCHEDULE 1 and 2: QK(j+1) issued, softmax(j) while QK(j+1) and PV(j-1) run, one wait(0) for
    both, acc rescaled and PV(j) issued unwaited, into softmax(j+1). Returns (S(j+1), acc, PV(j)'s P, m, l)."""
    s_next = _qk(q_s, k_s, k_bars, j + 1, q_s.shape[0], BLOCK_N, STAGES, s_layout, True)
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qk_scale, j * BLOCK_N, L, False, p_layout)
    _wait_tile(v_bars, j, STAGES)  # (a spin loop: ptxas keeps the wgmma wait below, after the softmax)
    # PV(j-1) and QK(j+1) done (a wait(1) here, then reading acc, makes ptxas serialize every wgmma)
    s, acc, p_prev = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[s_next, acc, p_prev])
    acc = _pv(p, alpha, acc, v_s, j, STAGES, o_layout)  # in flight into softmax(j+1)
    return s, acc, p, m_i, l_i  # p: PV(j)'s register operand, live until the next tile's wait


@gluon.jit
def _attend(desc_k, desc_v, q_s, k_s, v_s, q_bar, k_bars, v_bars, k_free, v_free, L, qk_scale, row0, n_tiles,
            BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, SCHEDULE: gl.constexpr):
    """This program's Q rows (q_s) against every key tile of its (batch, head), in the calling warps: (their O
    rows in bf16, ). SCHEDULE 0 and 1 refill the K/V ring themselves; SCHEDULE 2 frees its slots to
    the loader partition through k_free / v_free (unused otherwise)."""
    BLOCK_M: gl.constexpr = q_s.shape[0]
    nw: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    mbarrier.wait(q_bar, 0)
    s = _qk(q_s, k_s, k_bars, 0, BLOCK_M, BLOCK_N, STAGES, s_layout, False)
    if SCHEDULE == 1:  # K slot 0 is free: its QK is done
        _load(desc_k, k_s, k_bars, STAGES, n_tiles, row0, STAGES)
    if SCHEDULE == 2:  # and freed
        _release(k_free, 0, STAGES)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_layout)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_layout)
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    p_prev = gl.zeros([BLOCK_M, BLOCK_N], gl.bfloat16, p_layout)  # PV(j-1)'s register operand (SCHEDULE 1, 2)
    if SCHEDULE != 0:  # acc is carried between iterations as the token of an unwaited PV
        acc = hopper.warpgroup_mma_init(acc)
    for j in range(n_tiles - 1):  # full tiles: tile j+1's QK runs during tile j's softmax
        if SCHEDULE == 0:
            s_next = _qk(q_s, k_s, k_bars, j + 1, BLOCK_M, BLOCK_N, STAGES, s_layout, True)
            p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qk_scale, j * BLOCK_N, L, False, p_layout)
            acc = _pv(p, alpha, acc, v_s, j, STAGES, o_layout)
            s, acc = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[s_next, acc])
            _load_kv(desc_k, desc_v, k_s, v_s, k_bars, j + STAGES, n_tiles, row0, STAGES)  # tile j's slots are free
        else:
            s, acc, p_prev, m_i, l_i = _overlapped_tile(q_s, k_s, v_s, k_bars, v_bars, j, s, acc, p_prev, m_i, l_i,
                                                        qk_scale, L, BLOCK_N, STAGES, s_layout, o_layout, p_layout)
            if SCHEDULE == 1:
                if j > 0:  # tile j-1's V slot is free
                    _load(desc_v, v_s, v_bars, j - 1 + STAGES, n_tiles, row0, STAGES)
                _load(desc_k, k_s, k_bars, j + 1 + STAGES, n_tiles, row0, STAGES)  # tile j+1's K slot is free
            else:  # the same slots, freed to the loader
                _release(k_free, j + 1, STAGES)
                if j > 0:
                    _release(v_free, j - 1, STAGES)
    last = n_tiles - 1  # keys past L (the next head's rows, or TMA's zero fill) are masked
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qk_scale, last * BLOCK_N, L, True, p_layout)
    if SCHEDULE != 0:
        acc, p_prev = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[acc, p_prev])
        _wait_tile(v_bars, last, STAGES)
    acc = _pv(p, alpha, acc, v_s, last, STAGES, o_layout)
    acc, p = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[acc, p])
    return ((acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]).to(gl.bfloat16), )




@gluon.jit(do_not_specialize=["L"])
def gluon_attention_fwd(desc_q, desc_k, desc_v, O, L, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        D: gl.constexpr, STAGES: gl.constexpr, SCHEDULE: gl.constexpr):
    """Per tile j, SCHEDULE 0: QK(j+1), softmax(j), PV(j), wait(0). SCHEDULE 1: QK(j+1), softmax(j), wait(0)
    (QK(j+1) and PV(j-1) done), PV(j) left running into softmax(j+1). SCHEDULE 2: schedule 1's tiles in the
    num_warps consumer warps (the default partition), fed through "free" / "ready" mbarriers by one loader warp."""
    m0 = gl.program_id(0) * BLOCK_M
    row0 = gl.program_id(1) * L  # first row of this (batch, head) in the [B * H * L, D] views
    q_s = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, D], desc_q.layout)
    k_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D], desc_k.layout)
    v_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D], desc_v.layout)
    # SCHEDULE 0: one mbarrier a slot (k_bars) for K and V; SCHEDULE 1, 2: K and V slots have their own, a K
    # slot freeing when its QK is done, a V slot when its PV is
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    mbarrier.init(q_bar, count=1)
    if SCHEDULE == 2:
        # a slot's "free" mbarrier completes a phase when every consumer thread has arrived (each after its
        # warpgroup's wgmma wait retired the wgmma that read the slot)
        consumers: gl.constexpr = gl.num_warps() * 32
        k_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(k_free.index(i), count=consumers)
            mbarrier.init(v_free.index(i), count=consumers)
        hopper.fence_async_shared()  # the initialised barriers, before TMA (the async proxy) signals them
        n_tiles = gl.cdiv(L, BLOCK_N)
        # the default partition: these num_warps warps (2 warpgroups of 64 rows), consuming; one loader warp
        out = gl.warp_specialize([
            (_attend, (desc_k, desc_v, q_s, k_s, v_s, q_bar, k_bars, v_bars, k_free, v_free, L, qk_scale, row0,
                       n_tiles, BLOCK_N, D, STAGES, SCHEDULE)),
            (_loader, (desc_q, desc_k, desc_v, q_s, k_s, v_s, q_bar, k_bars, v_bars, k_free, v_free, row0, m0,
                       n_tiles, STAGES)),
        ], [1], [LOADER_REGS])
        # (the free mbarriers are not invalidated: their last arrivals are asynchronous, nobody waits for them,
        # and their shared memory is not reused)
    else:
        hopper.fence_async_shared()  # the initialised barriers, before TMA (the async proxy) signals them
        mbarrier.expect(q_bar, desc_q.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_q, [row0 + m0, 0], q_bar, q_s)
        n_tiles = gl.cdiv(L, BLOCK_N)
        for t in gl.static_range(STAGES):
            if SCHEDULE == 0:
                _load_kv(desc_k, desc_v, k_s, v_s, k_bars, t, n_tiles, row0, STAGES)
            else:
                _load(desc_k, k_s, k_bars, t, n_tiles, row0, STAGES)
                _load(desc_v, v_s, v_bars, t, n_tiles, row0, STAGES)
        out = _attend(desc_k, desc_v, q_s, k_s, v_s, q_bar, k_bars, v_bars, k_bars, v_bars, L, qk_scale, row0, n_tiles,
                      BLOCK_N, D, STAGES, SCHEDULE)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
    mbarrier.invalidate(q_bar)
    out = out[0]
    r = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out.type.layout))
    c = gl.arange(0, D, layout=gl.SliceLayout(0, out.type.layout))
    gl.store(O + (row0 + r)[:, None] * D + c[None, :], out, mask=(r < L)[:, None])


def _descriptor(rows2d: torch.Tensor, block_rows: int, d: int):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    layout = gl.NVMMASharedLayout.get_default_for([block_rows, d], gl.bfloat16)
    return TensorDescriptor.from_tensor(rows2d, [block_rows, d], layout)


def smem_bytes(block_m=128, block_n=128, d=128, stages=2, schedule=0) -> int:
    """Shared memory the kernel allocates: the bf16 Q tile and K/V rings, two mbarrier arrays of STAGES
    (16-byte aligned) and Q's mbarrier; SCHEDULE 2 adds the two "free" mbarrier arrays and Triton's
    warp-specialization state (WS_STATE_BYTES)."""
    barriers = 16 * math.ceil(8 * stages / 16)
    ws = 2 * barriers + WS_STATE_BYTES if schedule == 2 else 0
    return 2 * d * (block_m + 2 * stages * block_n) + 2 * barriers + 8 + ws


# Triton 3.6's warp_specialize keeps the loader partition's captured arguments (176 B here) and a partition
# state word (4 B) in shared memory (measured: compile_sm90(...).metadata.shared at every variant)
WS_STATE_BYTES = 180
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
CANDIDATES = [(128, 2), (128, 3), (128, 4), (64, 3), (64, 4), (64, 6)]  # (block_n, stages), where they fit
SCHEDULES = (0, 1, 2)
# what the GPU bench times at each head dim: the best of schedules 0 and 1 there (the H200 run before schedule 2:
# d=128 BN128 st3 s1 0.952 and s0 0.905 of cuDNN; d=64 BN64 st6/st4 s0 0.997/0.986, BN128 st2/st4 s1 0.993/0.974;
# BN64 with schedule 1, BN64 at d=128 and BN128 st2 s0 were slower) as baselines, then schedule 2
GPU_VARIANTS = {128: [(128, 3, 0), (128, 3, 1), (128, 2, 2), (128, 3, 2)],
                64: [(64, 4, 0), (64, 6, 0), (128, 2, 1), (128, 4, 1),
                     (128, 2, 2), (128, 3, 2), (64, 4, 2), (64, 6, 2)]}


def variants(d: int, block_m=128) -> list[tuple[int, int, int]]:
    """The (block_n, stages, schedule) combinations whose shared memory fits at head dim d (the CPU run
    compiles them all)."""
    return [(block_n, stages, schedule) for block_n, stages in CANDIDATES for schedule in SCHEDULES
            if smem_bytes(block_m, block_n, d, stages, schedule) <= SMEM_LIMIT]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m=128, block_n=128, stages=2, schedule=0,
              warps=8):
    """Dense attention of contiguous [B, H, L, D] bf16 tensors on an sm_90 GPU (SCHEDULE 2 launches `warps`
    consumer warps and one loader warp)."""
    B, H, L, D = q.shape
    out = torch.empty_like(q)
    rows = [x.reshape(B * H * L, D) for x in (q, k, v)]
    gluon_attention_fwd[(triton.cdiv(L, block_m), B * H)](
        _descriptor(rows[0], block_m, D), _descriptor(rows[1], block_n, D), _descriptor(rows[2], block_n, D),
        out, L, LOG2E / math.sqrt(D), BLOCK_M=block_m, BLOCK_N=block_n, D=D, STAGES=stages, SCHEDULE=schedule,
        num_warps=warps)
    return out


def compile_sm90(block_m=128, block_n=128, d=128, stages=2, schedule=0, warps=8):
    """The sm_90 CompiledKernel, built on the CPU (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    rows = torch.empty(1024, d, dtype=torch.bfloat16)
    signature = {"desc_q": mangle_type(_descriptor(rows, block_m, d)), "desc_k": mangle_type(_descriptor(rows, block_n, d)),
                 "desc_v": mangle_type(_descriptor(rows, block_n, d)), "O": "*bf16", "L": "i32", "qk_scale": "fp32",
                 "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "D": "constexpr", "STAGES": "constexpr",
                 "SCHEDULE": "constexpr"}
    source = GluonASTSource(fn=gluon_attention_fwd, signature=signature,
                            constexprs={(6,): block_m, (7,): block_n, (8,): d, (9,): stages, (10,): schedule},
                            attrs={(3,): [["tt.divisibility", 16]]})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


_ORDER_MARKS = {"HGMMA": "HGMMA", "WARPGROUP.DEPBAR": "wait", "MUFU.EX2": "EX2", "UTMALDG": "TMA"}
# and the synchronisation: named barriers (bar.sync of the CTA or of a partition), mbarrier waits, arrivals
# (a TMA load's expect, or a consumer's cp.async.mbarrier.arrive)
SYNC_MARKS = {**_ORDER_MARKS, "BAR.": "BAR", "SYNCS.PHASECHK": "mbwait", "SYNCS.ARRIVE": "arrive",
              "ARRIVES": "arrive"}


def loop_order(body: list[str], marks=_ORDER_MARKS) -> list[tuple[str, int]]:
    """A k-tile loop as runs of tensor-core MMAs, wgmma waits, exp2s and TMA loads (and with SYNC_MARKS
    barriers, mbarrier waits and arrivals), in issue order."""
    runs: list[tuple[str, int]] = []
    for instruction in body:
        name = instruction_name(instruction)
        mark = next((m for prefix, m in marks.items() if name.startswith(prefix)), None)
        if mark is None:
            continue
        if runs and runs[-1][0] == mark:
            runs[-1] = (mark, runs[-1][1] + 1)
        else:
            runs.append((mark, 1))
    return runs


def loader_loops(sass: str) -> list[list[str]]:
    """The innermost loops that issue TMA loads and no MMA (SCHEDULE 2's loader warp)."""
    def is_loader(body):
        names = [instruction_name(i) for i in body]
        return any(n.startswith("UTMALDG") for n in names) and not any(n.startswith(("HGMMA", "EXIT")) for n in names)

    return innermost_loops(sass, is_loader)


def _bar_threads(instruction: str) -> str:
    """Who a BAR.SYNC waits for: "the CTA", or the thread count of a named barrier (bar.sync id, threads)."""
    count = re.search(r"BAR\.SYNC\S*\s+[^,;]+,\s*(0x[0-9a-fA-F]+|\d+)", instruction)
    return f"{int(count.group(1), 0)} threads" if count else "the CTA"


def _runs(runs: list[tuple[str, int]]) -> str:
    return " ".join(f"{op} x{count}" for op, count in runs)


def _gpu_rows():
    """Table rows, one at a time: GPU_VARIANTS against cuDNN SDPA (timed once a shape)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    yield ("| B x H x L x D | block_n | K/V stages | schedule | max error / max | Gluon ms | cuDNN SDPA ms | "
           "cuDNN / Gluon |")
    yield "|---|---|---|---|---|---|---|---|"
    for shape in ((1, 2, 1000, 128), (1, 40, 75600, 128), (1, 48, 45106, 64)):
        q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = cudnn(q, k, v).float()
        theirs = triton.testing.do_bench(lambda: cudnn(q, k, v))
        for block_n, stages, schedule in GPU_VARIANTS[shape[3]]:
            run = lambda: attention(q, k, v, block_n=block_n, stages=stages, schedule=schedule)  # noqa: E731
            err = ((run().float() - ref).abs().max() / ref.abs().max()).item()
            ours = triton.testing.do_bench(run)
            yield (f"| {' x '.join(map(str, shape))} | {block_n} | {stages} | {schedule} | {err:.1e} | {ours:.2f} | "
                   f"{theirs:.2f} | {theirs / ours:.3f} |")


def _cpu_lines(d: int):
    """Per variant at head dim d, compiled for sm_90 on the CPU: a line of registers (and for SCHEDULE 2 the
    setmaxnreg of its consumers / loader), spills, shared memory, the named barriers (BAR.SYNC) in the
    k-tile loop and the loop's order; then the loop with its synchronisation, and SCHEDULE 2's loader loop."""
    yield (f"sm_90, head_dim {d}, block_m 128, 8 warps (schedule 2: + 1 loader warp; compiled on the CPU; "
           f"smem limit {SMEM_LIMIT} B)")
    for block_n, stages, schedule in variants(d):
        kernel = compile_sm90(block_n=block_n, d=d, stages=stages, schedule=schedule)
        sass, registers, stack = disassemble(kernel)
        loops = kernel_loops(sass)
        regs = [int(n) for _, n in re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", kernel.asm["ptx"])]
        note = f" (setmaxnreg {max(regs)} / {min(regs)})" if regs else ""
        bars = [i for body in loops for i in body if instruction_name(i).startswith("BAR.SYNC")]
        yield (f"block_n {block_n}, stages {stages}, schedule {schedule}: {registers} registers{note}, "
               f"{stack} B stack, "
               f"spills {sum(loop_table(body)['spills'] for body in loops)}, {kernel.metadata.shared} B shared "
               f"(expected {smem_bytes(128, block_n, d, stages, schedule)}), {len(bars)} BAR.SYNC"
               f"{' of ' + ' / '.join(sorted({_bar_threads(i) for i in bars})) if bars else ''}, {len(loops)} loop(s) "
               f"of {'/'.join(str(len(body)) for body in loops)} instructions: "
               f"{' | '.join(_runs(loop_order(body)) for body in loops)}")
        for n, body in enumerate(loops, 1):
            yield f"  k-tile loop {n} with its synchronisation: {_runs(loop_order(body, SYNC_MARKS))}"
        if schedule == 2:
            for body in loader_loops(sass):
                yield (f"  loader loop of {len(body)} instructions, spills {loop_table(body)['spills']}: "
                       f"{_runs(loop_order(body, SYNC_MARKS))}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head-dim", type=int, default=128, choices=(64, 128), help="CPU compile only")
    parser.add_argument("--out", help="also write the result to this file")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    head = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", ""] if gpu else []
    out = open(args.out, "w") if args.out else None
    try:  # line by line, so that a run cut short keeps its rows
        for line in itertools.chain(head, _gpu_rows() if gpu else _cpu_lines(args.head_dim)):
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()
    finally:
        if out:
            out.close()


if __name__ == "__main__":
    main()
