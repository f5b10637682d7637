"""The Gluon sparse kernel (kernels/gluon_attention.py) compiles for sm_90 on the CPU, fits shared
memory, and its k-tile loop issues the next tile's QK before this tile's softmax with one wgmma wait
a tile. Gluon never runs under the interpreter: tests/gpu checks its results."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

SCRIPT = r'''
import json, sys
from sparse_vdit.bench.gluon_dense import loop_order
from sparse_vdit.bench.kernel_sass import disassemble, kernel_loops, loop_table
from sparse_vdit.kernels.gluon_attention import compile_sm90

out = []
for d, bn in json.loads(sys.argv[1]):
    kernel = compile_sm90(head_dim=d, block_n=bn)
    sass, registers, stack = disassemble(kernel)
    loops = [(len(body), loop_table(body)["spills"], loop_order(body)) for body in kernel_loops(sass)]
    out.append({"shared": kernel.metadata.shared, "registers": registers, "stack": stack, "loops": loops})
print(json.dumps(out))
'''

CASES = [(64, 64), (128, 64), (128, 128)]


def test_gluon_kernel_compiles_for_sm90_with_the_overlapped_loop():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], env=env, capture_output=True,
                         text=True, timeout=900)
    if run.returncode and "not found" in run.stderr:
        pytest.skip("no ptxas / nvdisasm in this Triton install")
    assert run.returncode == 0, run.stderr[-3000:]
    from sparse_vdit.kernels.gluon_attention import SMEM_BUDGET, stages_for

    for (d, bn), got in zip(CASES, json.loads(run.stdout.splitlines()[-1])):
        stages = stages_for(128, bn, d)
        assert got["shared"] <= 232448 and 2 * d * (128 + 2 * stages * bn) <= SMEM_BUDGET
        assert len(got["loops"]) == 1, got["loops"]
        length, spills, order = got["loops"][0]
        # the next tile's QK (d / 16 wgmmas per warpgroup) first, the softmax's exp2s (bn / 2 a thread, and
        # alpha's), this tile's PV (bn / 16), one wait, the refill's TMA loads (inputs or copies: 2 each)
        assert order == [["HGMMA", d // 16], ["EX2", bn // 2 + 2], ["HGMMA", bn // 16], ["wait", 1], ["TMA", 4]]
        if (d, bn) != (128, 128):  # 128-key tiles at d = 128 spill in the masked path (255 registers)
            assert spills == 0 and got["stack"] == 0, (d, bn, spills)


def test_gluon_kernel_is_only_chosen_on_sm90_when_asked(monkeypatch):
    from sparse_vdit.kernels.triton_attention import _gluon_enabled

    q = torch.zeros(1, 1, 16, 64, dtype=torch.bfloat16)
    monkeypatch.setenv("SPARSE_VDIT_GLUON", "1")
    assert not _gluon_enabled(q, 128)  # a CPU tensor
    monkeypatch.setenv("SPARSE_VDIT_GLUON", "0")
    assert not _gluon_enabled(q, 128)
