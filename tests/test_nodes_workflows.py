"""The example workflows: current with example_workflows/build.py, only our node ids or core ids,
every link type-consistent, and our nodes' sockets / widgets as our schemas declare them."""

import importlib.util
import json
import os

import pytest

from test_nodes import comfy, extension_nodes  # noqa: F401  (comfy: fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOW_DIR = os.path.join(ROOT, "example_workflows")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# ComfyUI core node ids the workflows may use (v0.3.60 .. current)
CORE_NODES = {"UNETLoader", "CLIPLoader", "DualCLIPLoader", "VAELoader", "CLIPTextEncode", "FluxGuidance",
              "ModelSamplingSD3", "EmptyHunyuanLatentVideo", "KSampler", "KSamplerAdvanced", "VAEDecode", "SaveAnimatedWEBP",
              "PreviewImage"}


def load_build():
    spec = importlib.util.spec_from_file_location("workflow_build", os.path.join(WORKFLOW_DIR, "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = load_build()
NAMES = sorted(BUILD.WORKFLOWS)


def read(rel):
    with open(os.path.join(WORKFLOW_DIR, rel)) as f:
        return f.read()


def test_files_are_current_with_the_builder():
    for rel, text in BUILD.render().items():
        assert read(rel) == text, f"{rel} is stale: run python example_workflows/build.py"
    listed = {f for f in os.listdir(WORKFLOW_DIR) if f.endswith(".json")}
    assert listed == {f"{n}.json" for n in NAMES}


def test_our_node_specs_match_our_schemas(comfy):  # noqa: F811
    ours = {}
    for node in extension_nodes(comfy):
        s = node.define_schema()
        sockets = [(p.id, p.io_type) for p in s.inputs if p.io_type not in WIDGET_TYPES]
        widgets = [p.id for p in s.inputs if p.io_type in WIDGET_TYPES]
        outputs = [(p.options.get("display_name"), p.io_type) for p in s.outputs]
        ours[s.node_id] = (sockets, widgets, outputs)
    for node_type, spec in BUILD.SPECS.items():
        if node_type.startswith("SparseVDiT"):
            assert node_type in ours, f"{node_type} is not registered"
            assert tuple(spec) == ours[node_type], node_type
        else:
            assert node_type in CORE_NODES, f"{node_type} is neither ours nor a known core node"


@pytest.mark.parametrize("name", NAMES)
def test_ui_links_are_type_consistent(name):
    ui = json.loads(read(f"{name}.json"))
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]) and ui["last_node_id"] == max(nodes)
    for link_id, src, src_slot, dst, dst_slot, link_type in ui["links"]:
        out = nodes[src]["outputs"][src_slot]
        into = nodes[dst]["inputs"][dst_slot]
        assert out["type"] == into["type"] == link_type, (name, link_id)
        assert link_id in out["links"] and into["link"] == link_id
        assert BUILD.SPECS[nodes[dst]["type"]][0][dst_slot] == (into["name"], into["type"])
    for node in ui["nodes"]:
        sockets, widgets, _outputs = BUILD.SPECS[node["type"]]
        required = [s for s in sockets if (node["type"], s[0]) not in {("SparseVDiTSampler", "strategy"),
                                                                       ("SparseVDiTSampler", "latent")}]
        connected = {i["name"] for i in node["inputs"] if i["link"] is not None}
        assert {s[0] for s in required} <= connected, (name, node["type"])
        assert len(node["widgets_values"]) == len(widgets)


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_has_the_same_graph(name):
    ui = json.loads(read(f"{name}.json"))
    api = json.loads(read(f"api/{name}.json"))
    assert set(api) == {str(n["id"]) for n in ui["nodes"]}
    ui_links = {(str(dst), BUILD.SPECS[next(n["type"] for n in ui["nodes"] if n["id"] == dst)][0][slot][0]):
                [str(src), s_slot] for _id, src, s_slot, dst, slot, _t in ui["links"]}
    for node_id, node in api.items():
        sockets, widgets, _ = BUILD.SPECS[node["class_type"]]
        for key, value in node["inputs"].items():
            if isinstance(value, list):
                assert ui_links[(node_id, key)] == value
                src_type = BUILD.SPECS[api[value[0]]["class_type"]][2][value[1]][1]
                assert (key, src_type) in sockets, (name, node_id, key)
            else:
                assert key in widgets, (name, node_id, key)
