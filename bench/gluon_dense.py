"""A Gluon prototype of our full-tile loop with FA3's overlap, before it goes into the engine.

    python3 -m sparse_vdit.bench.gluon_dense [--out FILE]

Triton 3.6 waits for each tile's QK wgmma right after issuing it, so the tensor cores idle during
the softmax (bench/results/attention.md, after run J). In Gluon the waits are ours: here the QK of
tile j+1 is issued (async wgmma) before the softmax of tile j and the PV of tile j after it, with one
wait per tile; K/V tiles arrive by TMA into a ring of STAGES shared buffers, one mbarrier each. It is
dense attention ([B, H, L, D] bf16, full tiles unmasked, the last tile masked at L), i.e. the loop
our sparse kernel runs on full tiles.

On a GPU (sm_90) it checks itself against cuDNN SDPA at an odd length and at Wan2.1-14B 720p's and
CogVideoX1.5 768p's shapes, and times both; on the CPU (no GPU) it compiles for sm_90 at --head-dim
and prints the k-tile loop's instruction order.
Gluon does not run under TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from .kernel_sass import disassemble, instruction_name, kernel_loops, loop_table
from .report import emit

LOG2E = 1.4426950408889634


@gluon.jit
def _softmax_pv(s, m_i, l_i, acc, v_tile, qk_scale, col0, L, MASKED: gl.constexpr,
                o_layout: gl.constexpr, p_layout: gl.constexpr):
    """One tile's online-softmax update; its PV wgmma is issued async and returned unwaited."""
    if MASKED:
        cols = col0 + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s.type.layout))
        s = gl.where((cols < L)[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + gl.sum(p, axis=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    acc = hopper.warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_tile, acc, is_async=True)
    return m_new, l_i, acc


@gluon.jit
def _issue_kv(desc_k, desc_v, k_s, v_s, bars, tile, row0, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads of K/V tile `tile` into its ring slot, signalling that slot's mbarrier."""
    stage = tile % STAGES
    mbarrier.expect(bars.index(stage), 2 * desc_k.block_type.nbytes)
    tma.async_copy_global_to_shared(desc_k, [row0 + tile * BLOCK_N, 0], bars.index(stage), k_s.index(stage))
    tma.async_copy_global_to_shared(desc_v, [row0 + tile * BLOCK_N, 0], bars.index(stage), v_s.index(stage))


@gluon.jit
def gluon_attention_fwd(desc_q, desc_k, desc_v, O, L, qk_scale,
                        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr):
    nw: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    m0 = gl.program_id(0) * BLOCK_M
    row0 = gl.program_id(1) * L  # first row of this (batch, head) in the [B * H * L, D] views
    q_s = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, D], desc_q.layout)
    k_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D], desc_k.layout)
    v_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D], desc_v.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES + 1, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES + 1):
        mbarrier.init(bars.index(i), count=1)
    hopper.fence_async_shared()  # the initialised barriers, before TMA (the async proxy) signals them
    q_bar = bars.index(STAGES)
    mbarrier.expect(q_bar, desc_q.block_type.nbytes)
    tma.async_copy_global_to_shared(desc_q, [row0 + m0, 0], q_bar, q_s)
    n_tiles = gl.cdiv(L, BLOCK_N)
    for t in gl.static_range(STAGES):
        if t < n_tiles:
            _issue_kv(desc_k, desc_v, k_s, v_s, bars, t, row0, BLOCK_N, STAGES)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(bars.index(0), 0)
    s = hopper.warpgroup_mma(q_s, k_s.index(0).permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout))

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_layout)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_layout)
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    for j in range(n_tiles - 1):  # full tiles: tile j+1's QK runs during tile j's softmax
        nxt = (j + 1) % STAGES
        mbarrier.wait(bars.index(nxt), ((j + 1) // STAGES) & 1)
        s_next = hopper.warpgroup_mma(q_s, k_s.index(nxt).permute((1, 0)),
                                      gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), is_async=True)
        m_i, l_i, acc = _softmax_pv(s, m_i, l_i, acc, v_s.index(j % STAGES), qk_scale, j * BLOCK_N, L, False,
                                    o_layout, p_layout)
        s, acc = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[s_next, acc])
        if j + STAGES < n_tiles:  # tile j's slot is free again
            _issue_kv(desc_k, desc_v, k_s, v_s, bars, j + STAGES, row0, BLOCK_N, STAGES)
    last = n_tiles - 1  # keys past L (the next head's rows, or TMA's zero fill) are masked
    m_i, l_i, acc = _softmax_pv(s, m_i, l_i, acc, v_s.index(last % STAGES), qk_scale, last * BLOCK_N, L, True,
                                o_layout, p_layout)
    acc = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    for i in gl.static_range(STAGES + 1):
        mbarrier.invalidate(bars.index(i))
    out = (acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]).to(gl.bfloat16)
    r = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    c = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    gl.store(O + (row0 + r)[:, None] * D + c[None, :], out, mask=(r < L)[:, None])


def _descriptor(rows2d: torch.Tensor, block_rows: int, d: int):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    layout = gl.NVMMASharedLayout.get_default_for([block_rows, d], gl.bfloat16)
    return TensorDescriptor.from_tensor(rows2d, [block_rows, d], layout)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m=128, block_n=128, stages=2, warps=8):
    """Dense attention of contiguous [B, H, L, D] bf16 tensors on an sm_90 GPU."""
    B, H, L, D = q.shape
    out = torch.empty_like(q)
    rows = [x.reshape(B * H * L, D) for x in (q, k, v)]
    gluon_attention_fwd[(triton.cdiv(L, block_m), B * H)](
        _descriptor(rows[0], block_m, D), _descriptor(rows[1], block_n, D), _descriptor(rows[2], block_n, D),
        out, L, LOG2E / math.sqrt(D), BLOCK_M=block_m, BLOCK_N=block_n, D=D, STAGES=stages, num_warps=warps)
    return out


def compile_sm90(block_m=128, block_n=128, d=128, stages=2, warps=8):
    """The sm_90 CompiledKernel, built on the CPU (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    rows = torch.empty(1024, d, dtype=torch.bfloat16)
    signature = {"desc_q": mangle_type(_descriptor(rows, block_m, d)), "desc_k": mangle_type(_descriptor(rows, block_n, d)),
                 "desc_v": mangle_type(_descriptor(rows, block_n, d)), "O": "*bf16", "L": "i32", "qk_scale": "fp32",
                 "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "D": "constexpr", "STAGES": "constexpr"}
    source = GluonASTSource(fn=gluon_attention_fwd, signature=signature,
                            constexprs={(6,): block_m, (7,): block_n, (8,): d, (9,): stages},
                            attrs={(3,): [["tt.divisibility", 16]]})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


_ORDER_MARKS = {"HGMMA": "HGMMA", "WARPGROUP.DEPBAR": "wait", "MUFU.EX2": "EX2", "UTMALDG": "TMA"}


def loop_order(body: list[str]) -> list[tuple[str, int]]:
    """A k-tile loop as runs of tensor-core MMAs, wgmma waits, exp2s and TMA loads, in issue order."""
    runs: list[tuple[str, int]] = []
    for instruction in body:
        name = instruction_name(instruction)
        mark = next((m for prefix, m in _ORDER_MARKS.items() if name.startswith(prefix)), None)
        if mark is None:
            continue
        if runs and runs[-1][0] == mark:
            runs[-1] = (mark, runs[-1][1] + 1)
        else:
            runs.append((mark, 1))
    return runs


def _gpu_rows() -> list[str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    rows = ["| B x H x L x D | K/V stages | max error / max | Gluon ms | cuDNN SDPA ms | cuDNN / Gluon |",
            "|---|---|---|---|---|---|"]
    for shape in ((1, 2, 1000, 128), (1, 40, 75600, 128), (1, 48, 45106, 64)):
        q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = cudnn(q, k, v).float()
        theirs = triton.testing.do_bench(lambda: cudnn(q, k, v))
        for stages in (2, 3):  # 3 slots of 128 x 128 at d = 128 use 224 KB of the 227 KB
            err = ((attention(q, k, v, stages=stages).float() - ref).abs().max() / ref.abs().max()).item()
            ours = triton.testing.do_bench(lambda s=stages: attention(q, k, v, stages=s))
            rows.append(f"| {' x '.join(map(str, shape))} | {stages} | {err:.1e} | {ours:.2f} | {theirs:.2f} | "
                        f"{theirs / ours:.3f} |")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head-dim", type=int, default=128, choices=(64, 128), help="CPU compile only")
    parser.add_argument("--out", help="also write the result to this file")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        emit("\n".join([f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", "",
                        *_gpu_rows()]), args.out)
        return
    kernel = compile_sm90(d=args.head_dim)
    sass, registers, stack = disassemble(kernel)
    lines = [f"sm_90, head_dim {args.head_dim} (compiled on the CPU): {registers} registers, {stack} B stack, "
             f"{kernel.metadata.shared} B shared"]
    for n, body in enumerate(kernel_loops(sass), 1):
        order = " ".join(f"{op} x{count}" for op, count in loop_order(body))
        lines.append(f"loop {n}: {len(body)} instructions, spills {loop_table(body)['spills']}: {order}")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
