"""bench/gluon_dense.py: the Gluon prototype compiles for sm_90 on the CPU in every variant. In the default
one (block_n 128, schedule 0) the k-tile loop issues the next tile's QK among this tile's exp2s (the overlap
Triton 3.6 does not give); in schedule 1 the loop's one wgmma wait comes before the PV, which runs on
into the next tile's softmax; schedule 2 (warp specialization) runs schedule 1's loop in the consumer
warps with no TMA load and one bar.sync of its own 256 threads (not the CTA's) a tile, and a loader warp
loop of mbarrier waits and TMA loads."""

import functools
import os
import re
import subprocess
import sys

import pytest

from sparse_vdit.bench.gluon_dense import (GPU_VARIANTS, SMEM_LIMIT, SYNC_MARKS, loop_order, smem_bytes,
                                           variants)

BODY = [
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0",
    "MUFU.EX2 R3, R3",
    "MUFU.EX2 R4, R4",
    "FMUL R5, R5, R6",
    "@P0 HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ",
    "WARPGROUP.ARRIVE",
    "WARPGROUP.DEPBAR.LE gsb0, 0x0",
    "BAR.SYNC.DEFER_BLOCKING 0x0, 0x100",
    "ARRIVES.LDGSTSBAR.64.ARVCNT [UR42+0x280d0]",
    "@!P0 SYNCS.ARRIVE.TRANS64 RZ, [UR8+0x380b0], R3",
    "SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR14+0x280b0], R88",
    "UTMALDG.2D [UR8], [UR10]",
]

_LINE = re.compile(r"block_n (\d+), stages (\d+), schedule (\d+): (\d+) registers(?: \(setmaxnreg (\d+) / (\d+)\))?, "
                   r"(\d+) B stack, spills (\d+), (\d+) B shared \(expected (\d+)\), "
                   r"(\d+) BAR\.SYNC(?: of ([\w /]+))?, (\d+) loop\(s\) of [\d/]+ instructions: (.*)")
_SYNC = re.compile(r"  k-tile loop \d+ with its synchronisation: (.*)")
_LOADER = re.compile(r"  loader loop of (\d+) instructions, spills (\d+): (.*)")


def _parse_runs(text):
    tokens = text.split()  # "HGMMA x3 EX2 x11 ..."
    return [(name, int(count[1:])) for name, count in zip(tokens[::2], tokens[1::2])]


def test_loop_order_runs_marks_in_issue_order():
    assert loop_order(BODY) == [("HGMMA", 1), ("EX2", 2), ("HGMMA", 1), ("wait", 1), ("TMA", 1)]
    assert loop_order(["FMUL R1, R2, R3"]) == []
    assert loop_order(BODY, SYNC_MARKS) == [("HGMMA", 1), ("EX2", 2), ("HGMMA", 1), ("wait", 1), ("BAR", 1),
                                            ("arrive", 2), ("mbwait", 1), ("TMA", 1)]


def test_variants_fit_in_shared_memory():
    assert smem_bytes(128, 128, 128, 3) <= SMEM_LIMIT < smem_bytes(128, 128, 128, 4)
    assert smem_bytes(128, 64, 128, 6) <= SMEM_LIMIT < smem_bytes(128, 64, 128, 7)
    assert smem_bytes(128, 128, 128, 3, 2) <= SMEM_LIMIT and smem_bytes(128, 64, 128, 6, 2) <= SMEM_LIMIT
    assert [v for v in variants(128) if v[2] == 0] == [(128, 2, 0), (128, 3, 0), (64, 3, 0), (64, 4, 0), (64, 6, 0)]
    assert [v[:2] for v in variants(128) if v[2] == 2] == [(128, 2), (128, 3), (64, 3), (64, 4), (64, 6)]
    assert len(variants(64)) == 18
    for d, timed in GPU_VARIANTS.items():  # the GPU bench times fitting variants, schedule 2 among them
        assert set(timed) <= set(variants(d)) and any(v[2] == 2 for v in timed)


@functools.cache
def _compiled(head_dim):
    """{(block_n, stages, schedule): {registers, setmaxnreg, stack, spills, shared, expected, bars, bar_kind,
    loops, runs, sync, loader}} from the CPU run of the bench at head_dim."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "sparse_vdit.bench.gluon_dense", "--head-dim", str(head_dim)], env=env,
                         capture_output=True, text=True, timeout=900)
    if run.returncode and "not found" in run.stderr:
        pytest.skip("no ptxas / nvdisasm in this Triton install")
    assert run.returncode == 0, run.stderr[-3000:]
    table, row = {}, None
    for line in run.stdout.splitlines():
        if match := _LINE.fullmatch(line):
            (block_n, stages, schedule, registers, inc, dec, stack, spills, shared, expected, bars, bar_kind, loops,
             order) = match.groups()
            row = table[int(block_n), int(stages), int(schedule)] = dict(
                registers=int(registers), setmaxnreg=(int(inc), int(dec)) if inc else None, stack=int(stack),
                spills=int(spills), shared=int(shared), expected=int(expected), bars=int(bars), bar_kind=bar_kind,
                loops=int(loops), runs=_parse_runs(order), sync=[], loader=[])
        elif match := _SYNC.fullmatch(line):
            row["sync"].append(_parse_runs(match.group(1)))
        elif match := _LOADER.fullmatch(line):
            row["loader"].append((int(match.group(1)), int(match.group(2)), _parse_runs(match.group(3))))
    return table


@pytest.mark.parametrize("head_dim", [128, 64])
def test_every_variant_compiles_and_its_shared_memory_is_as_computed(head_dim):
    table = _compiled(head_dim)
    assert sorted(table) == sorted(variants(head_dim))
    for row in table.values():
        assert row["loops"] == 1 == len(row["sync"]) and row["registers"] <= 255
        assert row["shared"] == row["expected"] <= SMEM_LIMIT


@pytest.mark.parametrize("head_dim", [128, 64])
def test_the_prototype_overlaps_the_next_qk_with_the_softmax(head_dim):
    row = _compiled(head_dim)[128, 2, 0]
    runs = row["runs"]
    assert row["stack"] == 0 and row["spills"] == 0
    names = [name for name, _ in runs]
    # per warpgroup (64 rows) and 128-key tile: QK is head_dim / 16 wgmmas of k = 16, PV 128 / 16
    first_ex2, last_ex2 = names.index("EX2"), len(names) - 1 - names[::-1].index("EX2")
    qk_before_softmax_ends = sum(n for name, n in runs[:last_ex2] if name == "HGMMA")
    assert names[0] == "HGMMA" and qk_before_softmax_ends == head_dim // 16  # the next QK, among the exp2s
    assert any(name == "HGMMA" for name in names[first_ex2:last_ex2])  # interleaved, not before them all
    assert runs[last_ex2 + 1:] == [("HGMMA", 8), ("wait", 1), ("TMA", 2)]  # PV, one wait, the refill


def _check_overlapped_tile(runs, head_dim, block_n):
    """Schedule 1's tile order (schedule 2 runs the same helper): one wait (wait(0), for QK(j+1) and PV(j-1))
    after all the softmax's p exp2s, the QK before it; after it only the alpha exp2s and PV(j)'s block_n / 16
    wgmmas of k = 16, no wait for the PV, which stays in flight over the back edge into the next softmax.
    Returns the runs after the PV."""
    names = [name for name, _ in runs]
    assert names.count("wait") == 1
    wait = names.index("wait")
    assert sum(n for name, n in runs[:wait] if name == "HGMMA") == head_dim // 16
    assert sum(n for name, n in runs[:wait] if name == "EX2") >= block_n // 2  # 64 rows x block_n / 128
    after = [run for run in runs[wait + 1:] if run[0] != "EX2"]
    assert after[0] == ("HGMMA", block_n // 16)
    return after[1:]


@pytest.mark.parametrize("head_dim", [128, 64])
def test_schedule_1_leaves_the_pv_running_past_the_loops_one_wait(head_dim):
    for (block_n, stages, schedule), row in _compiled(head_dim).items():
        names = [name for name, _ in row["runs"]]
        if schedule == 0:  # the PV, then the wait for it
            assert names[-3:] == ["HGMMA", "wait", "TMA"]
            assert row["bars"] >= 3 and row["bar_kind"] == "the CTA"
        if schedule == 1:  # then the refills, from the consumer warps
            assert _check_overlapped_tile(row["runs"], head_dim, block_n) == [("TMA", 2)], (block_n, stages)
            assert row["bars"] >= 3 and row["bar_kind"] == "the CTA"


@pytest.mark.parametrize("head_dim", [128, 64])
def test_schedule_2_consumers_run_schedule_1s_tiles_without_loads_or_a_cta_barrier(head_dim):
    rows = {key: row for key, row in _compiled(head_dim).items() if key[2] == 2}
    assert {key[:2] for key in rows} == {key[:2] for key in variants(head_dim)}
    for (block_n, stages, _), row in rows.items():
        # the consumer warps get the registers the 24 of the loader warp leave them, and spill nothing
        assert row["setmaxnreg"] == (240, 24) and row["stack"] == 0 and row["spills"] == 0, (block_n, stages)
        # the next QK is issued among this tile's softmax exp2s, then the one wait, the PV, nothing else
        runs = row["runs"]
        names = [name for name, _ in runs]
        first_qk, wait = names.index("HGMMA"), names.index("wait")
        assert sum(n for name, n in runs[:first_qk] if name == "EX2") <= 2  # QK before the softmax's exp2s
        assert _check_overlapped_tile(runs, head_dim, block_n) == [], (block_n, stages)
        assert "TMA" not in names
        # no CTA-wide barrier: one bar.sync of the consumer partition's 256 threads (Triton's shared-memory
        # barrier pass, between two waits or arrivals on the same mbarrier array), after the wgmma wait,
        # then the two slot releases
        assert row["bars"] == 1 and row["bar_kind"] == "256 threads"
        sync = row["sync"][0]
        sync_names = [name for name, _ in sync]
        assert sync_names.count("BAR") == 1 and sync_names.index("BAR") > sync_names.index("wait")
        assert sync[sync_names.index("BAR") + 1:] == [("arrive", 2)]
        assert sum(n for name, n in sync if name == "mbwait") == 2  # K(j+1), then V(j), ready
        assert sync_names.index("mbwait") < sync_names.index("HGMMA")
        # the loader warp: wait for a free slot, expect, TMA load (one box of 64 columns a load), no MMA, no bar
        ((length, spills, loader),) = row["loader"]
        boxes = head_dim // 64
        assert spills == 0 and length < 100
        assert loader == [("mbwait", 1), ("arrive", 1), ("TMA", boxes)] * (len(loader) // 3) and len(loader) >= 6
