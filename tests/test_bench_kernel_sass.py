"""bench/kernel_sass.py: loop finding on a disassembly, and the real kernel's k-tile loops."""

import os
import re
import subprocess
import sys

import pytest

from sparse_vdit.bench.kernel_sass import kernel_loops, loop_table

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0020*/                   FSEL R2, R3, -INF , P0 ;
        /*0030*/               @P1 BRA `(.L_x_1) ;
.L_x_2:
        /*0040*/                   UTMALDG.2D [UR8], [UR10] ;
.L_x_3:
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0060*/                   LDL R5, [R1+0x4] ;
        /*0070*/               @P2 BRA `(.L_x_3) ;
        /*0080*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0090*/               @P3 BRA `(.L_x_2) ;
        /*00a0*/                   EXIT ;
.L_x_4:
        /*00b0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR10], R24 ;
        /*00c0*/              @!P0 BRA `(.L_x_4) ;
        /*00d0*/                   BRA `(.L_x_3) ;
"""


def test_loops_are_the_innermost_mma_loops_with_their_counts():
    loops = kernel_loops(SASS)
    # neither the outer loop (.L_x_2, two MMAs) nor the wait block after EXIT branching back into one
    assert [len(b) for b in loops] == [3, 3]
    first, second = (loop_table(b) for b in loops)
    assert (first["mma"], first["score_selects"], first["spills"]) == (1, 1, 0)
    assert (second["mma"], second["score_selects"], second["spills"]) == (1, 0, 1)


@pytest.mark.parametrize("cap", [None, 128], ids=["uncapped", "maxnreg128"])
def test_the_kernel_has_full_and_masked_loops_per_load_path(cap):
    # also under the autotuner's register cap at d = 64 (two CTAs an SM), which must hold
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "sparse_vdit.bench.kernel_sass", "--head-dim", "64"]
                         + (["--maxnreg", str(cap)] if cap else []), env=env,
                         capture_output=True, text=True, timeout=600)
    if run.returncode and "not found" in run.stderr:
        pytest.skip("no ptxas / nvdisasm in this Triton install")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| ") and "loop" not in line]
    loops = [dict(n=int(r[1]), mma=int(r[2]), tma=int(r[3]), selects=int(r[5])) for r in rows]
    # frame-major and space-major heads: full and masked loops by TMA; cube order: gathered loads
    assert [(lp["tma"] > 0, lp["selects"] > 0) for lp in loops] == [
        (True, False), (True, True), (True, False), (True, True), (False, False), (False, True)]
    full, masked = loops[0]["n"], loops[1]["n"]
    assert full < masked and all(lp["mma"] == loops[0]["mma"] for lp in loops)
    registers = int(re.search(r"(\d+) registers", run.stdout).group(1))
    assert registers <= (cap or 255)


def test_paired_full_tiles_are_one_loop_of_two_tiles_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "sparse_vdit.bench.kernel_sass", "--head-dim", "128", "--paired"],
                         env=env, capture_output=True, text=True, timeout=600)
    if run.returncode and "not found" in run.stderr:
        pytest.skip("no ptxas / nvdisasm in this Triton install")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| ") and "loop" not in line]
    loops = [dict(n=int(r[1]), mma=int(r[2]), tma=int(r[3]), selects=int(r[5]), spills=int(r[6])) for r in rows]
    single = min(lp["mma"] for lp in loops)
    pairs = [lp for lp in loops if lp["mma"] == 2 * single]
    # one paired loop per TMA source (inputs, copies), each two tiles' loads and MMAs, unmasked
    assert len(pairs) == 2 and all(lp["tma"] == 4 and lp["selects"] == 0 and lp["spills"] == 0 for lp in pairs)
    full = next(lp for lp in loops if lp["mma"] == single and lp["selects"] == 0 and lp["tma"] == 2)
    assert pairs[0]["n"] < 2 * full["n"]  # fewer instructions a tile than one tile a step
