"""Opt-in: our pack inside a real ComfyUI (CPU, loopback), through ../shared/tools/comfyui-harness.sh.

Runs when COMFYUI_ROOT (a ComfyUI work tree the harness may use) or COMFYUI_GIT (a bare clone it
extracts from) is set; COMFY_VENV as the harness documents. A tiny random-weight Wan2.1 checkpoint
goes through UNETLoader -> Apply Strategy (reference kernel forced on CPU) -> KSampler next to an
unpatched KSampler: an all-dense strategy must give the identical latent, a sparse one a different
latent. A helper pack written here supplies random conditioning (no text encoder needed) and
reports which of our node ids ComfyUI registered (what /object_info lists).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HARNESS = os.environ.get("COMFYUI_HARNESS", os.path.join(os.path.dirname(ROOT), "shared", "tools",
                                                          "comfyui-harness.sh"))
COMFY_ROOT = os.environ.get("COMFYUI_ROOT")
COMFY_GIT = os.environ.get("COMFYUI_GIT")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not (COMFY_ROOT or COMFY_GIT), reason="set COMFYUI_ROOT or COMFYUI_GIT"),
              pytest.mark.skipif(not os.path.isfile(HARNESS), reason=f"no harness at {HARNESS}")]

HELPER_PACK = '''
"""Test-only nodes: random conditioning, and the list of registered Sparse-vDiT node ids."""
import torch
import nodes as comfy_nodes


class SVTestConditioning:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "tokens": ("INT", {"default": 8})}}

    def run(self, seed, tokens):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, 4096, generator=g), {}]],)


class SVTestRegistry:
    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def run(self):
        ids = sorted(k for k in comfy_nodes.NODE_CLASS_MAPPINGS if k.startswith("SparseVDiT"))
        return {"ui": {"text": ids}}


NODE_CLASS_MAPPINGS = {"SVTestConditioning": SVTestConditioning, "SVTestRegistry": SVTestRegistry}
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_strategies(folder):
    from sparse_vdit.strategies.file import save_strategy
    from sparse_vdit.strategies.patterns import Dense, Diagonal, Skip
    from sparse_vdit.strategies.strategy import Strategy

    os.makedirs(folder, exist_ok=True)
    for name, pair in (("sparse", (Diagonal(0.3), Skip())), ("alldense", (Dense(), Dense()))):
        rows = (pair,) * 3
        save_strategy(Strategy(layers=3, heads=2, sigma_edges=(1.0, 0.0), patterns=(rows,)),
                      os.path.join(folder, f"tiny_wan_{name}.safetensors"))


def workflow() -> dict:
    sampler = {"seed": 0, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
               "denoise": 1.0, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]}
    nodes = {
        "1": ("UNETLoader", {"unet_name": "tiny_wan.safetensors", "weight_dtype": "default"}),
        "2": ("SVTestConditioning", {"seed": 1, "tokens": 8}),
        "3": ("SVTestConditioning", {"seed": 2, "tokens": 8}),
        "4": ("EmptyHunyuanLatentVideo", {"width": 64, "height": 48, "length": 9, "batch_size": 1}),
        "5": ("SparseVDiTLoadStrategy", {"strategy_name": "tiny_wan_sparse.safetensors"}),
        "6": ("SparseVDiTLoadStrategy", {"strategy_name": "tiny_wan_alldense.safetensors"}),
        "7": ("SparseVDiTApplyStrategy", {"model": ["1", 0], "strategy": ["5", 0], "force_reference": True}),
        "8": ("SparseVDiTApplyStrategy", {"model": ["1", 0], "strategy": ["6", 0], "force_reference": True}),
        "9": ("KSampler", dict(sampler, model=["1", 0])),
        "10": ("KSampler", dict(sampler, model=["7", 0])),
        "11": ("KSampler", dict(sampler, model=["8", 0])),
        "12": ("SaveLatent", {"samples": ["9", 0], "filename_prefix": "svtest/dense"}),
        "13": ("SaveLatent", {"samples": ["10", 0], "filename_prefix": "svtest/sparse"}),
        "14": ("SaveLatent", {"samples": ["11", 0], "filename_prefix": "svtest/alldense"}),
        "15": ("SVTestRegistry", {}),
        "16": ("SparseVDiTStrategyInfo", {"strategy": ["5", 0], "frames": 3, "height": 3, "width": 4}),
    }
    return {k: {"class_type": t, "inputs": i} for k, (t, i) in nodes.items()}


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    from safetensors.torch import save_file

    sys.path.insert(0, HERE)
    from tiny_models import tiny_wan_state

    work = tmp_path_factory.mktemp("comfyui")
    models = work / "models"
    os.makedirs(models)
    save_file(tiny_wan_state(), str(models / "tiny_wan.safetensors"))
    write_strategies(str(models / "sparse_strategies"))
    (work / "extra.yaml").write_text(f"svtest:\n  base_path: {models}\n  sparse_strategies: sparse_strategies\n")
    pack = work / "svtest_nodes"
    os.makedirs(pack)
    (pack / "__init__.py").write_text(textwrap.dedent(HELPER_PACK))
    (work / "workflow.api.json").write_text(json.dumps(workflow()))
    env = dict(os.environ, COMFY_EXTRA_ARGS=f"--extra-model-paths-config {work / 'extra.yaml'}")
    env.pop("TRITON_INTERPRET", None)  # set by tests/conftest.py for our own CPU tests, not for ComfyUI
    if COMFY_ROOT:
        env["COMFY_ROOT"] = COMFY_ROOT
    cmd = ["bash", HARNESS, "-n", ROOT, "-n", str(pack), "-w", str(work / "workflow.api.json"),
           "-m", str(models), "-p", str(free_port()), "-t", "600", "-o", str(work / "history.json")]
    if COMFY_GIT:
        cmd += ["-g", COMFY_GIT]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, f"harness rc {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return json.loads((work / "history.json").read_text())


def saved_latent(history, node_id):
    from safetensors.torch import load_file

    item = history["outputs"][node_id]["latents"][0]
    root = COMFY_ROOT or "/tmp/ComfyUI"
    return load_file(os.path.join(root, "output", item["subfolder"], item["filename"]))["latent_tensor"]


def test_every_node_is_registered(history):
    registered = set(history["outputs"]["15"]["text"])
    assert {"SparseVDiTApplyStrategy", "SparseVDiTLoadStrategy", "SparseVDiTSaveStrategy",
            "SparseVDiTRetargetStrategy", "SparseVDiTStrategyInfo", "SparseVDiTCompare",
            "SparseVDiTSearch"} <= registered


def test_all_dense_strategy_is_bit_identical_and_a_sparse_one_is_not(history):
    dense, sparse, alldense = (saved_latent(history, n) for n in ("12", "13", "14"))
    assert dense.shape == (1, 16, 3, 6, 8) and torch.isfinite(sparse).all()
    assert torch.equal(alldense, dense)
    assert not torch.allclose(sparse, dense, atol=1e-4)


def test_strategy_info_runs_inside_comfyui(history):
    text = history["outputs"]["16"]["text"][0]
    assert "3 layers x 2 heads" in text and "grid 3x3x4" in text
