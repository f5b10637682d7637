"""Opt-in: our pack inside a real ComfyUI (CPU, loopback), through ../shared/tools/comfyui-harness.sh.

Runs when COMFYUI_ROOT (a ComfyUI work tree the harness may use) or COMFYUI_GIT (a bare clone it
extracts from) is set; COMFY_VENV as the harness documents. Tiny random-weight Wan2.1 and
HunyuanVideo checkpoints go through UNETLoader -> Apply Strategy (reference kernel forced on CPU)
-> KSampler next to an unpatched KSampler: an all-dense strategy must give the identical latent, a
sparse one a different latent. A helper pack written here supplies random conditioning (no text
encoder needed) and reports which of our node ids ComfyUI registered (what /object_info lists).
The API-format example workflows also run, with the tiny models swapped in (random conditioning
for the text encoders, latent-as-image for VAE Decode, 2 steps), the Search flow included.
"""

import json
import os
import re
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
        return {"required": {"seed": ("INT", {"default": 0}), "tokens": ("INT", {"default": 8}),
                             "pooled": ("BOOLEAN", {"default": False})}}

    def run(self, seed, tokens, pooled):
        g = torch.Generator().manual_seed(seed)
        extra = {"pooled_output": torch.randn(1, 768, generator=g)} if pooled else {}
        return ([[torch.randn(1, tokens, 4096, generator=g), extra]],)


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


class SVTestLatentImage:
    """Stands in for VAE Decode: latent channels 0..2 as RGB frames in [0, 1], 8x upscaled."""
    CATEGORY = "testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    def run(self, samples):
        x = samples["samples"][0, :3].float()  # [3, F, H, W]
        x = torch.sigmoid(x).repeat_interleave(8, -1).repeat_interleave(8, -2)
        return (x.permute(1, 2, 3, 0).contiguous(),)


NODE_CLASS_MAPPINGS = {"SVTestConditioning": SVTestConditioning, "SVTestRegistry": SVTestRegistry,
                       "SVTestLatentImage": SVTestLatentImage}
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAMILIES = {"wan": 3, "hunyuan": 4}  # family -> layers of the tiny checkpoint (2 heads each)


def write_strategies(folder):
    from sparse_vdit.strategies.file import save_strategy
    from sparse_vdit.strategies.patterns import Dense, Diagonal, Skip
    from sparse_vdit.strategies.strategy import Strategy

    os.makedirs(folder, exist_ok=True)
    for family, layers in FAMILIES.items():
        for name, pair in (("sparse", (Diagonal(0.3), Skip())), ("alldense", (Dense(), Dense()))):
            rows = (pair,) * layers
            save_strategy(Strategy(layers=layers, heads=2, sigma_edges=(1.0, 0.0), patterns=(rows,)),
                          os.path.join(folder, f"tiny_{family}_{name}.safetensors"))


def family_nodes(family: str, base: int) -> tuple[dict, dict]:
    """Loader, conditioning, latent, two strategies, three samplers, three SaveLatent nodes; and their ids."""
    ids = {name: str(base + i) for i, name in enumerate(
        ["unet", "pos", "neg", "latent", "sparse", "alldense", "apply_sparse", "apply_alldense",
         "ks_dense", "ks_sparse", "ks_alldense", "save_dense", "save_sparse", "save_alldense"])}
    pooled = family == "hunyuan"
    sampler = workflow_sampler(ids)
    nodes = {
        "unet": ("UNETLoader", {"unet_name": f"tiny_{family}.safetensors", "weight_dtype": "default"}),
        "pos": ("SVTestConditioning", {"seed": 1, "tokens": 8, "pooled": pooled}),
        "neg": ("SVTestConditioning", {"seed": 2, "tokens": 8, "pooled": pooled}),
        "latent": ("EmptyHunyuanLatentVideo", {"width": 64, "height": 48, "length": 9, "batch_size": 1}),
    }
    for kind in ("sparse", "alldense"):
        nodes[kind] = ("SparseVDiTLoadStrategy", {"strategy_name": f"tiny_{family}_{kind}.safetensors"})
        nodes[f"apply_{kind}"] = ("SparseVDiTApplyStrategy", {"model": [ids["unet"], 0], "strategy": [ids[kind], 0],
                                                             "force_reference": True})
    for kind, model in (("dense", ids["unet"]), ("sparse", ids["apply_sparse"]), ("alldense", ids["apply_alldense"])):
        nodes[f"ks_{kind}"] = ("KSampler", dict(sampler, model=[model, 0]))
        nodes[f"save_{kind}"] = ("SaveLatent", {"samples": [ids[f"ks_{kind}"], 0],
                                                "filename_prefix": f"svtest/{family}_{kind}"})
    return {ids[name]: {"class_type": t, "inputs": i} for name, (t, i) in nodes.items()}, ids


def lora_nodes(wan: dict) -> tuple[dict, dict]:
    """A LoRA on the tiny Wan, then the all-dense Apply; and the Apply, then the LoRA."""
    sampler = dict(workflow_sampler(wan))
    ids = {"lora": "50", "ks_lora": "51", "apply_after_lora": "52", "ks_apply_after_lora": "53",
           "lora_after_apply": "54", "ks_lora_after_apply": "55"}
    lora = {"lora_name": "tiny_wan_lora.safetensors", "strength_model": 1.0}
    nodes = {
        "50": ("LoraLoaderModelOnly", dict(lora, model=[wan["unet"], 0])),
        "51": ("KSampler", dict(sampler, model=["50", 0])),
        "52": ("SparseVDiTApplyStrategy", {"model": ["50", 0], "strategy": [wan["alldense"], 0], "force_reference": True}),
        "53": ("KSampler", dict(sampler, model=["52", 0])),
        "54": ("LoraLoaderModelOnly", dict(lora, model=[wan["apply_alldense"], 0])),
        "55": ("KSampler", dict(sampler, model=["54", 0])),
    }
    for n, source in (("56", "51"), ("57", "53"), ("58", "55")):
        nodes[n] = ("SaveLatent", {"samples": [source, 0], "filename_prefix": f"svtest/lora_{n}"})
        ids[f"save_{source}"] = n
    return {k: {"class_type": t, "inputs": i} for k, (t, i) in nodes.items()}, ids


def workflow_sampler(ids: dict) -> dict:
    return {"seed": 0, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
            "positive": [ids["pos"], 0], "negative": [ids["neg"], 0], "latent_image": [ids["latent"], 0]}


def workflow() -> tuple[dict, dict]:
    """The whole prompt and, per family (and "lora"), the node ids of its parts."""
    prompt, ids = {}, {}
    for n, family in enumerate(FAMILIES):
        nodes, ids[family] = family_nodes(family, 100 * (n + 1))
        prompt.update(nodes)
    nodes, ids["lora"] = lora_nodes(ids["wan"])
    prompt.update(nodes)
    prompt["1"] = {"class_type": "SVTestRegistry", "inputs": {}}
    prompt["2"] = {"class_type": "SparseVDiTStrategyInfo",
                   "inputs": {"strategy": [ids["wan"]["sparse"], 0], "frames": 3, "height": 3, "width": 4}}
    return prompt, ids


def tiny_example(api: dict, family: str, offset: int) -> dict:
    """An example API workflow with the tiny models swapped in: random conditioning for the text
    encoders, latent-as-image for VAE Decode, a tiny size, 2 steps, the reference kernel."""
    def ref(link):
        return [str(offset + int(link[0])), link[1]] if isinstance(link, list) else link

    out = {}
    for node_id, node in api.items():
        kind, inputs = node["class_type"], {k: ref(v) for k, v in node["inputs"].items()}
        if kind in ("CLIPLoader", "DualCLIPLoader", "VAELoader"):
            continue
        if kind == "CLIPTextEncode":
            kind, inputs = "SVTestConditioning", {"seed": int(node_id), "tokens": 8, "pooled": family == "hunyuan"}
        elif kind == "VAEDecode":
            kind, inputs = "SVTestLatentImage", {"samples": inputs["samples"]}
        elif kind == "UNETLoader":  # (both Wan2.2 experts become the one tiny Wan)
            inputs["unet_name"] = f"tiny_{family}.safetensors"
        elif kind == "EmptyHunyuanLatentVideo":
            inputs.update(width=64, height=48, length=9)
        elif kind in ("KSampler", "SparseVDiTSearch"):
            inputs["steps"] = 2
        elif kind == "KSamplerAdvanced":  # keep the split: first expert step 0..1, second 1..end
            inputs.update(steps=2, start_at_step=min(inputs["start_at_step"], 1),
                          end_at_step=1 if inputs["end_at_step"] < inputs["steps"] else inputs["end_at_step"])
        if kind == "SparseVDiTLoadStrategy":
            inputs["strategy_name"] = f"tiny_{family}_sparse.safetensors"
        elif kind == "SparseVDiTApplyStrategy":
            inputs["force_reference"] = True
        elif kind == "SparseVDiTSearch":
            inputs.update(filename_prefix=f"svtest/search_{offset}", resume=False)
        elif kind == "SaveAnimatedWEBP":
            inputs["filename_prefix"] = f"svtest/webp_{offset}"
        out[str(offset + int(node_id))] = {"class_type": kind, "inputs": inputs}
    return out


EXAMPLES = ["wan21_t2v_sparse", "wan21_search_strategy", "wan21_compare_dense_sparse", "hunyuan_video_t2v_sparse",
            "wan22_t2v_a14b_two_experts"]


def run_harness(work, prompt):
    """POST ``prompt`` to a fresh harness-run ComfyUI with our pack, the helper pack and the tiny
    models; returns the /history entry. No sparse call may have fallen back to dense (server log)."""
    from safetensors.torch import save_file

    sys.path.insert(0, HERE)
    from tiny_models import tiny_hunyuan_state, tiny_wan_lora, tiny_wan_state

    models = work / "models"
    os.makedirs(models)
    save_file(tiny_wan_state(), str(models / "tiny_wan.safetensors"))
    save_file(tiny_hunyuan_state(), str(models / "tiny_hunyuan.safetensors"))
    save_file(tiny_wan_lora(), str(models / "tiny_wan_lora.safetensors"))
    write_strategies(str(models / "sparse_strategies"))
    (work / "extra.yaml").write_text(f"svtest:\n  base_path: {models}\n  sparse_strategies: sparse_strategies\n")
    pack = work / "svtest_nodes"
    os.makedirs(pack)
    (pack / "__init__.py").write_text(textwrap.dedent(HELPER_PACK))
    (work / "workflow.api.json").write_text(json.dumps(prompt))
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
    log = re.search(r"stopped; log: (\S+)", run.stderr)
    with open(log.group(1)) as f:
        fallbacks = [line for line in f if "Sparse-vDiT" in line and "dense" in line]
    assert not fallbacks, f"sparse calls fell back to dense attention: {fallbacks[:3]}"
    return json.loads((work / "history.json").read_text())


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    prompt = {}
    for n, name in enumerate(EXAMPLES):
        with open(os.path.join(ROOT, "example_workflows", "api", f"{name}.json")) as f:
            prompt.update(tiny_example(json.load(f), "hunyuan" if "hunyuan" in name else "wan", 1000 * (n + 1)))
    return run_harness(tmp_path_factory.mktemp("examples"), prompt)


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    prompt, ids = workflow()
    return run_harness(tmp_path_factory.mktemp("comfyui"), prompt), ids


def saved_latent(history, node_id):
    from safetensors.torch import load_file

    item = history["outputs"][node_id]["latents"][0]
    root = COMFY_ROOT or "/tmp/ComfyUI"
    return load_file(os.path.join(root, "output", item["subfolder"], item["filename"]))["latent_tensor"]


def test_every_node_is_registered(history):
    registered = set(history[0]["outputs"]["1"]["text"])
    assert {"SparseVDiTApplyStrategy", "SparseVDiTLoadStrategy", "SparseVDiTSaveStrategy",
            "SparseVDiTRetargetStrategy", "SparseVDiTStrategyInfo", "SparseVDiTCompare",
            "SparseVDiTSearch"} <= registered


@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_dense_strategy_is_bit_identical_and_a_sparse_one_is_not(history, family):
    outputs, ids = history[0], history[1][family]
    dense, sparse, alldense = (saved_latent(outputs, ids[f"save_{k}"]) for k in ("dense", "sparse", "alldense"))
    assert dense.shape == (1, 16, 3, 6, 8) and torch.isfinite(sparse).all()
    assert torch.equal(alldense, dense)
    assert not torch.allclose(sparse, dense, atol=1e-4)


def test_strategy_info_runs_inside_comfyui(history):
    text = history[0]["outputs"]["2"]["text"][0]
    assert "3 layers x 2 heads" in text and "grid 3x3x4" in text


def test_api_example_workflows_run_with_tiny_models(examples):
    assert examples["status"]["status_str"] == "success"
    outputs = examples["outputs"]
    search = outputs[str(2000 + 8)]["text"][0]  # wan21_search_strategy's Search node
    assert search.startswith("saved models/sparse_strategies/svtest/search_2000_00001.safetensors")
    for compare_id in (2000 + 15, 3000 + 14):  # the Compare nodes of the search and compare flows
        assert "PSNR" in outputs[str(compare_id)]["text"][0]
    assert outputs[str(1000 + 12)]["images"]  # the Wan T2V example's animated WEBP
    assert outputs[str(4000 + 13)]["images"]  # the HunyuanVideo example's animated WEBP
    assert outputs[str(5000 + 17)]["images"]  # the Wan2.2 two-expert example's animated WEBP


def test_works_with_a_lora_before_or_after_apply(history):
    outputs, ids = history[0], history[1]["lora"]
    dense = saved_latent(outputs, history[1]["wan"]["save_dense"])
    lora, apply_after, lora_after = (saved_latent(outputs, ids[f"save_{n}"]) for n in ("51", "53", "55"))
    assert not torch.allclose(lora, dense, atol=1e-4), "the LoRA must change the result"
    assert torch.equal(apply_after, lora) and torch.equal(lora_after, lora)


@pytest.mark.skipif(not os.environ.get("COMFYUI_TEST_COMPILE"), reason="set COMFYUI_TEST_COMPILE=1 (CPU inductor: minutes)")
def test_works_under_torch_compile_model(tmp_path):
    nodes, ids = family_nodes("wan", 100)
    nodes["900"] = {"class_type": "TorchCompileModel", "inputs": {"model": [ids["apply_sparse"], 0], "backend": "inductor"}}
    nodes["901"] = {"class_type": "KSampler", "inputs": dict(nodes[ids["ks_sparse"]]["inputs"], model=["900", 0])}
    nodes["902"] = {"class_type": "SaveLatent", "inputs": {"samples": ["901", 0], "filename_prefix": "svtest/compiled"}}
    outputs = run_harness(tmp_path, nodes)
    sparse, compiled = saved_latent(outputs, ids["save_sparse"]), saved_latent(outputs, "902")
    torch.testing.assert_close(compiled, sparse, rtol=1e-4, atol=1e-4)
