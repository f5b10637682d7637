"""The Gluon sparse kernel (kernels/gluon_attention.py) compiles for sm_90 on the CPU, fits shared
memory, and its two k-tile loops (full tiles, then masked ones) issue the next tile's QK before this
tile's softmax with one wgmma wait a tile. Gluon never runs under the interpreter: tests/gpu checks its results."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

SCRIPT = r'''
import json, os, subprocess, sys, tempfile
import triton
from sparse_vdit.bench.gluon_dense import loop_order
from sparse_vdit.bench.kernel_sass import disassemble, kernel_loops, loop_table
from sparse_vdit.kernels.gluon_attention import compile_sm90

out = []
for d, bn, cap, ws, fast in json.loads(sys.argv[1]):
    kernel = compile_sm90(head_dim=d, block_n=bn, maxnreg=cap, warp_spec=ws, fast_start=fast)
    sass, registers, stack = disassemble(kernel)
    loops = [(len(body), loop_table(body)["spills"], loop_order(body)) for body in kernel_loops(sass)]
    with tempfile.TemporaryDirectory() as tmp:  # ptxas's advisories (Triton drops them), e.g. C7514
        ptx = os.path.join(tmp, "k.ptx")
        open(ptx, "w").write(kernel.asm["ptx"])
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        run = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    advisories = [line for line in (run.stdout + run.stderr).splitlines() if "Performance Loss" in line]
    ops = [line.split("*/")[-1] for line in sass.splitlines() if "*/" in line]
    first = {op: next((i for i, line in enumerate(ops) if op in line), None) for op in ("UTMALDG", "STS")}
    out.append({"shared": kernel.metadata.shared, "registers": registers, "stack": stack, "loops": loops,
                "advisories": advisories, "first": first})
print(json.dumps(out))
'''

CASES = [(64, 64), (128, 64), (128, 128)]
CAPPED = (64, 64, 128, False)  # SPARSE_VDIT_GLUON=r128: two CTAs an SM at d = 64 (6 slots in half an SM)
WARP_SPECIALIZED = [(128, 64, None, True), (64, 64, None, True)]  # SPARSE_VDIT_GLUON=ws


def _compiled(cases):
    """SCRIPT's findings for (head_dim, block_n, register cap, warp-specialized, fast start) cases."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)],
                         env=env, capture_output=True, text=True, timeout=900)
    if run.returncode and "not found" in run.stderr:
        pytest.skip("no ptxas / nvdisasm in this Triton install")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_gluon_kernel_compiles_for_sm90_with_the_overlapped_loop():
    from sparse_vdit.kernels.gluon_attention import SMEM_BUDGET, stages_for

    results = _compiled([c + (None, False, False) for c in CASES]
                        + [c + (False,) for c in [CAPPED] + WARP_SPECIALIZED])
    warp_specialized = [results.pop() for _ in WARP_SPECIALIZED][::-1]
    capped = results.pop()
    assert capped["registers"] <= 128 and capped["advisories"] == [] and len(capped["loops"]) == 2
    from sparse_vdit.kernels.gluon_attention import TWO_CTA_BUDGET

    assert capped["shared"] <= TWO_CTA_BUDGET + 1024 and 2 * (capped["shared"] + 1024) <= 228 * 1024
    for (d, bn), got in zip(CASES, results):
        stages = stages_for(128, bn, d)
        assert got["shared"] <= 232448 and 2 * d * (128 + 2 * stages * bn) <= SMEM_BUDGET
        assert got["advisories"] == []  # e.g. C7514: ptxas serializing every wgmma
        assert len(got["loops"]) == 2, got["loops"]  # the full tiles' loop, then the masked tiles' loop
        (_, _, full), (_, _, masked) = got["loops"]
        for order in (full, masked):  # one QK (d / 16 wgmmas a warpgroup) and one PV (bn / 16) a tile,
            # then the refill's TMA loads (from the inputs or from copies: 2 each)
            assert sum(n for name, n in order if name == "HGMMA") == d // 16 + bn // 16, order
            assert order[-2:] == [["wait", 1], ["TMA", 4]], order
        # full tiles: the next tile's QK issued before this tile's softmax ends, one wgmma wait
        names = [name for name, _ in full]
        assert "HGMMA" in names[:len(names) - 1 - names[::-1].index("EX2")] and names.count("wait") == 1, full
        # masked tiles one at a time: softmax, PV, wait, the next QK, wait, the refill
        assert masked == [["EX2", bn // 2 + 2], ["HGMMA", bn // 16], ["wait", 1], ["HGMMA", d // 16], ["wait", 1],
                          ["TMA", 4]], masked
        full_loop_spills = got["loops"][0][1]
        if (d, bn) != (128, 128):  # 128-key tiles at d = 128 spill (255 registers)
            assert full_loop_spills == 0 and got["loops"][1][1] == 0 and got["stack"] == 0, (d, bn)
    # warp-specialized: the consumers' two loops load nothing (the loader warp does) and do not spill; full
    # tiles leave PV in flight into the next tile's softmax
    for (d, bn, _, _), got in zip(WARP_SPECIALIZED, warp_specialized):
        assert got["advisories"] == [] and len(got["loops"]) == 2, got
        (_, full_spills, full), (_, masked_spills, masked) = got["loops"]
        assert full_spills == 0 and masked_spills == 0, got["loops"]
        for order in (full, masked):
            assert sum(n for name, n in order if name == "HGMMA") == d // 16 + bn // 16, order
            assert "TMA" not in [name for name, _ in order], order
        names = [name for name, _ in full]
        assert "HGMMA" in names[:len(names) - 1 - names[::-1].index("EX2")] and names.count("wait") == 1, full
        assert full[-1] == ["HGMMA", bn // 16], full  # PV(j) issued after the wait, left running into softmax(j+1)
        assert masked == [["EX2", bn // 2 + 2], ["HGMMA", bn // 16], ["wait", 1], ["HGMMA", d // 16], ["wait", 1]], \
            masked


@pytest.mark.parametrize("env,capability,head_dim,dtype,triton_version,expected", [
    (None, (9, 0), 64, torch.bfloat16, "3.6.0", "r128"),     # auto: measured faster at d = 64
    (None, (9, 0), 128, torch.bfloat16, "3.6.0", "ws"),      # auto: warp-specialized, faster at d = 128
    (None, (9, 0), 128, torch.float16, "3.5.1", None),
    (None, (9, 0), 64, torch.bfloat16, "3.5.1", None),       # auto only on the Triton it is tested with
    (None, (8, 9), 64, torch.float16, "3.6.0", None),        # not sm_90
    (None, (9, 0), 64, torch.float32, "3.6.0", None),        # no fp32 wgmma path
    ("0", (9, 0), 64, torch.bfloat16, "3.6.0", None),
    ("1", (9, 0), 128, torch.bfloat16, "3.6.0", "1"),
    ("r128", (9, 0), 128, torch.float16, "3.6.0", "r128"),
    ("ws", (9, 0), 128, torch.bfloat16, "3.6.0", "ws"),
    ("2", (9, 0), 64, torch.bfloat16, "3.6.0", None),         # an unknown mode: the Triton kernel
])
def test_gluon_kernel_choice(env, capability, head_dim, dtype, triton_version, expected, monkeypatch):
    import types

    import triton

    from sparse_vdit.kernels.triton_attention import _gluon_mode

    if env is None:
        monkeypatch.delenv("SPARSE_VDIT_GLUON", raising=False)
    else:
        monkeypatch.setenv("SPARSE_VDIT_GLUON", env)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(triton, "__version__", triton_version)
    q = types.SimpleNamespace(is_cuda=True, dtype=dtype, shape=(1, 1, 16, head_dim), device="cuda:0")
    if env == "2":
        with pytest.warns(UserWarning, match="SPARSE_VDIT_GLUON='2' is not one of auto, 0, 1, r128, ws"):
            assert _gluon_mode(q, 128) == expected
    else:
        assert _gluon_mode(q, 128) == expected
    assert _gluon_mode(q, 64) is None  # 64-row q-tiles: the Triton kernel
    assert _gluon_mode(torch.zeros(1, 1, 16, head_dim, dtype=dtype), 128) is None  # a CPU tensor
    # a layer with more masked tiles than GLUON_MASKED_PERCENT (3D windows) gets the Triton kernel in auto;
    # a forced mode ignores it
    from sparse_vdit.kernels.triton_attention import GLUON_MASKED_PERCENT

    assert _gluon_mode(q, 128, GLUON_MASKED_PERCENT) == expected
    assert _gluon_mode(q, 128, GLUON_MASKED_PERCENT + 1) == (None if env is None else expected)


def test_warp_specialized_kernel_refuses_two_slots():
    """With 2 slots its loader would wait forever (a slot is freed a tile late): a compile error, not a hang."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = ("from sparse_vdit.kernels.gluon_attention import compile_sm90\n"
              "compile_sm90(head_dim=64, block_n=64, stages=2, warp_spec=True)")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "needs 3 K/V slots or more" in run.stderr, run.stderr[-2000:]


def test_fast_start_leaves_the_tile_loops_as_they_were():
    """SPARSE_VDIT_GLUON_FAST_START=1 starts a q-tile's walk from vector loads of its runs instead of a
    loop of dependent loads, and (not warp-specialized) stores Q to shared memory after the first K/V
    loads are issued; its values stay out of the tile loops: the same loops, no more spills (with more
    than 4 runs a load, the capped kernel's masked loop spilled 169 instructions against 64)."""
    cases = [c + (fast,) for c in (CAPPED, WARP_SPECIALIZED[0]) for fast in (False, True)]
    results = _compiled(cases)
    for walk, fast in (results[0:2], results[2:4]):
        assert fast["advisories"] == [] and fast["registers"] <= walk["registers"]
        assert len(fast["loops"]) == len(walk["loops"]) == 2
        for (n0, spills0, order0), (n1, spills1, order1) in zip(walk["loops"], fast["loops"]):
            assert order1 == order0 and spills1 <= spills0 + 1 and abs(n1 - n0) <= 0.02 * n0, (walk, fast)
    # not warp-specialized, Q's shared-memory store comes after the first K/V TMA load, not before it
    walk, fast = results[0:2]
    assert walk["first"]["STS"] < walk["first"]["UTMALDG"] and fast["first"]["UTMALDG"] < fast["first"]["STS"]
