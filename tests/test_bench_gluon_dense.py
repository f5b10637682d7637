"""bench/gluon_dense.py: the Gluon prototype compiles for sm_90 on the CPU in every variant. In the default
one (block_n 128, schedule 0) the k-tile loop issues the next tile's QK among this tile's exp2s (the overlap
Triton 3.6 does not give); in schedule 1 the loop's one wgmma wait comes before the PV, which runs on
into the next tile's softmax."""

import functools
import os
import re
import subprocess
import sys

import pytest

from sparse_vdit.bench.gluon_dense import SMEM_LIMIT, loop_order, smem_bytes, variants

BODY = [
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0",
    "MUFU.EX2 R3, R3",
    "MUFU.EX2 R4, R4",
    "FMUL R5, R5, R6",
    "@P0 HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ",
    "WARPGROUP.ARRIVE",
    "WARPGROUP.DEPBAR.LE gsb0, 0x0",
    "UTMALDG.2D [UR8], [UR10]",
]

_LINE = re.compile(r"block_n (\d+), stages (\d+), schedule (\d+): (\d+) registers, (\d+) B stack, spills (\d+), "
                   r"(\d+) B shared \(expected (\d+)\), (\d+) loop\(s\) of [\d/]+ instructions: (.*)")


def test_loop_order_runs_marks_in_issue_order():
    assert loop_order(BODY) == [("HGMMA", 1), ("EX2", 2), ("HGMMA", 1), ("wait", 1), ("TMA", 1)]
    assert loop_order(["FMUL R1, R2, R3"]) == []


def test_variants_fit_in_shared_memory():
    assert smem_bytes(128, 128, 128, 3) <= SMEM_LIMIT < smem_bytes(128, 128, 128, 4)
    assert smem_bytes(128, 64, 128, 6) <= SMEM_LIMIT < smem_bytes(128, 64, 128, 7)
    assert [v for v in variants(128) if v[2] == 0] == [(128, 2, 0), (128, 3, 0), (64, 3, 0), (64, 4, 0), (64, 6, 0)]
    assert len(variants(64)) == 12


@functools.cache
def _compiled(head_dim):
    """{(block_n, stages, schedule): (registers, stack, spills, shared, expected shared, loops, runs)} from the
    CPU run of the bench at head_dim."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "sparse_vdit.bench.gluon_dense", "--head-dim", str(head_dim)], env=env,
                         capture_output=True, text=True, timeout=900)
    if run.returncode and "not found" in run.stderr:
        pytest.skip("no ptxas / nvdisasm in this Triton install")
    assert run.returncode == 0, run.stderr[-3000:]
    table = {}
    for line in run.stdout.splitlines():
        match = _LINE.fullmatch(line)
        if match:
            *numbers, order = match.groups()
            tokens = order.split()  # "HGMMA x3 EX2 x11 ..."
            runs = [(name, int(count[1:])) for name, count in zip(tokens[::2], tokens[1::2])]
            table[tuple(map(int, numbers[:3]))] = (*map(int, numbers[3:]), runs)
    return table


@pytest.mark.parametrize("head_dim", [128, 64])
def test_every_variant_compiles_and_its_shared_memory_is_as_computed(head_dim):
    table = _compiled(head_dim)
    assert sorted(table) == sorted(variants(head_dim))
    for registers, stack, spills, shared, expected, loops, runs in table.values():
        assert loops == 1 and registers <= 255
        assert shared == expected <= SMEM_LIMIT


@pytest.mark.parametrize("head_dim", [128, 64])
def test_the_prototype_overlaps_the_next_qk_with_the_softmax(head_dim):
    *_, stack, spills, _, _, _, runs = _compiled(head_dim)[128, 2, 0]
    assert stack == 0 and spills == 0
    names = [name for name, _ in runs]
    # per warpgroup (64 rows) and 128-key tile: QK is head_dim / 16 wgmmas of k = 16, PV 128 / 16
    first_ex2, last_ex2 = names.index("EX2"), len(names) - 1 - names[::-1].index("EX2")
    qk_before_softmax_ends = sum(n for name, n in runs[:last_ex2] if name == "HGMMA")
    assert names[0] == "HGMMA" and qk_before_softmax_ends == head_dim // 16  # the next QK, among the exp2s
    assert any(name == "HGMMA" for name in names[first_ex2:last_ex2])  # interleaved, not before them all
    assert runs[last_ex2 + 1:] == [("HGMMA", 8), ("wait", 1), ("TMA", 2)]  # PV, one wait, the refill


@pytest.mark.parametrize("head_dim", [128, 64])
def test_schedule_1_leaves_the_pv_running_past_the_loops_one_wait(head_dim):
    for (block_n, stages, schedule), (*_, runs) in _compiled(head_dim).items():
        names = [name for name, _ in runs]
        if schedule == 0:  # the PV, then the wait for it
            assert names[-3:] == ["HGMMA", "wait", "TMA"]
            continue
        # one wait (wait(0), for QK(j+1) and PV(j-1)) after all the softmax's p exp2s; the QK before it;
        # after it only the alpha exp2s, PV(j)'s block_n / 16 wgmmas of k = 16 and the refills: no wait
        # for the PV, which stays in flight over the back edge into the next tile's softmax
        assert names.count("wait") == 1, (block_n, stages)
        wait = names.index("wait")
        assert sum(n for name, n in runs[:wait] if name == "HGMMA") == head_dim // 16
        assert sum(n for name, n in runs[:wait] if name == "EX2") >= block_n // 2  # 64 rows x block_n / 128
        assert [run for run in runs[wait + 1:] if run[0] != "EX2"] == [("HGMMA", block_n // 16), ("TMA", 2)]
