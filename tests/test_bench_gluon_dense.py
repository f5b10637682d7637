"""bench/gluon_dense.py: the Gluon prototype compiles for sm_90 on the CPU, and its k-tile loop
issues the next tile's QK among this tile's exp2s (the overlap Triton 3.6 does not give)."""

import os
import subprocess
import sys

import pytest

from sparse_vdit.bench.gluon_dense import loop_order

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


def test_loop_order_runs_marks_in_issue_order():
    assert loop_order(BODY) == [("HGMMA", 1), ("EX2", 2), ("HGMMA", 1), ("wait", 1), ("TMA", 1)]
    assert loop_order(["FMUL R1, R2, R3"]) == []


@pytest.mark.parametrize("head_dim", [128, 64])
def test_the_prototype_overlaps_the_next_qk_with_the_softmax(head_dim):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "sparse_vdit.bench.gluon_dense", "--head-dim", str(head_dim)], env=env,
                         capture_output=True, text=True, timeout=600)
    if run.returncode and "not found" in run.stderr:
        pytest.skip("no ptxas / nvdisasm in this Triton install")
    assert run.returncode == 0, run.stderr[-3000:]
    loops = [line for line in run.stdout.splitlines() if line.startswith("loop ")]
    assert len(loops) == 1 and "spills 0" in loops[0]
    tokens = loops[0].rsplit(": ", 1)[1].split()  # "HGMMA x3 EX2 x11 ..."
    runs = [(name, int(count[1:])) for name, count in zip(tokens[::2], tokens[1::2])]
    names = [name for name, _ in runs]
    # per warpgroup (64 rows) and 128-key tile: QK is head_dim / 16 wgmmas of k = 16, PV 128 / 16
    first_ex2, last_ex2 = names.index("EX2"), len(names) - 1 - names[::-1].index("EX2")
    qk_before_softmax_ends = sum(n for name, n in runs[:last_ex2] if name == "HGMMA")
    assert names[0] == "HGMMA" and qk_before_softmax_ends == head_dim // 16  # the next QK, among the exp2s
    assert any(name == "HGMMA" for name in names[first_ex2:last_ex2])  # interleaved, not before them all
    assert runs[last_ex2 + 1:] == [("HGMMA", 8), ("wait", 1), ("TMA", 2)]  # PV, one wait, the refill
