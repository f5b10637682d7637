"""Opt-in: bench/comfyui_parity.py --tiny against a real ComfyUI tree (CPU).

Runs when COMFYUI_ROOT is set, in COMFY_VENV's Python when given (ComfyUI's own dependencies,
torchsde among them), else in this one. Checks what makes the GPU timings comparable: ComfyUI's
native Wan, loaded through its own detector from our converted weights, computes the same function
as the diffusers model behind our adapter (unpatched, all-dense and sparse strategy), the all-dense
Apply is bit-identical to the unpatched native model, and every row is measured.
``COMFYUI_TEST_COMPILE=1`` adds the compiled rows (TorchCompileModel's way; about a minute).
"""

import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
COMFY_ROOT = os.environ.get("COMFYUI_ROOT")
pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(not COMFY_ROOT, reason="set COMFYUI_ROOT")]


def python() -> str:
    venv = os.environ.get("COMFY_VENV")
    return os.path.join(venv, "bin", "python") if venv else sys.executable


def run_bench(tmp_path, sections: str) -> tuple[str, list[list[str]]]:
    pp = tmp_path / "pp"
    pp.mkdir()
    (pp / "sparse_vdit").symlink_to(ROOT)
    out = tmp_path / "parity.md"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pp), COMFY_ROOT]), COMFYUI_ROOT=COMFY_ROOT,
               HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # the CPU rows use the reference kernel
    proc = subprocess.run([python(), "-m", "sparse_vdit.bench.comfyui_parity", "--tiny", "--sections", sections,
                           "--repeats", "1", "--warmup", "1", "--out", str(out)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.startswith(("| eager", "| compiled"))]
    return table, rows


def check(table: str, rows: list[list[str]], modes: tuple[str, ...]) -> None:
    assert len(rows) == 6 * len(modes), table
    assert not [r for r in rows if r[4].startswith("not measured")], table
    for mode in modes:
        mine = {(r[1], r[2]): r for r in rows if r[0] == mode}
        assert set(mine) == {(p, s) for p in ("native", "diffusers stock") for s in ("unpatched",)} | \
            {(p, s) for p in ("native + Apply", "adapter") for s in ("all-dense", "sparse 0.25")}, table
        dense = float(re.search(r"to eager unpatched ([0-9.e+-]+)", mine[("native + Apply", "all-dense")][9]).group(1))
        if mode == "eager":
            assert dense == 0, table  # all-dense Apply is bit-identical to the unpatched model
        else:
            assert dense < 1e-4, table  # inductor's fusions round differently
        for key in (("diffusers stock", "unpatched"), ("adapter", "all-dense"), ("adapter", "sparse 0.25")):
            rel = float(re.search(r"native vs adapter rel\. max abs diff ([0-9.e+-]+)", mine[key][9]).group(1))
            assert rel < 1e-4, (key, table)
            assert float(mine[key][8]) > 0, table  # a native / adapter ratio was computed
        sparse = mine[("native + Apply", "sparse 0.25")][9]
        sparse_diff = float(re.search(r"to eager unpatched ([0-9.e+-]+)", sparse).group(1))
        assert sparse_diff > 0, table  # the sparse strategy really changed the output


def test_parity_bench_tiny_eager(tmp_path):
    table, rows = run_bench(tmp_path, "eager")
    check(table, rows, ("eager",))
    assert "issue #6 acceptance" in table and "slower" in table


@pytest.mark.skipif(os.environ.get("COMFYUI_TEST_COMPILE") != "1", reason="set COMFYUI_TEST_COMPILE=1")
def test_parity_bench_tiny_compiled(tmp_path):
    table, rows = run_bench(tmp_path, "eager,compiled")
    check(table, rows, ("eager", "compiled"))
    assert "graphs" in table
