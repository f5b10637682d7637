"""Writes the example workflows: UI format (example_workflows/*.json, what ComfyUI lists as
templates) and their API-format twins (example_workflows/api/*.json, for POST /prompt).

Run ``python example_workflows/build.py`` after changing a workflow or a node's inputs;
tests/test_nodes_workflows.py checks the files are current and every link is type-consistent.
Each workflow is a list of nodes: (id, type, {widget: value}, {input: (source id, output slot)}).
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
STRATEGY = "SPARSE_VDIT_STRATEGY"

# type -> (sockets in: [(name, type)], widgets in order, outputs: [(name, type)]).
# Widget names starting with "!" exist only in the UI (e.g. KSampler's control_after_generate).
SPECS = {
    "UNETLoader": ([], ["unet_name", "weight_dtype"], [("MODEL", "MODEL")]),
    "CLIPLoader": ([], ["clip_name", "type", "device"], [("CLIP", "CLIP")]),
    "DualCLIPLoader": ([], ["clip_name1", "clip_name2", "type", "device"], [("CLIP", "CLIP")]),
    "VAELoader": ([], ["vae_name"], [("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], ["guidance"], [("CONDITIONING", "CONDITIONING")]),
    "ModelSamplingSD3": ([("model", "MODEL")], ["shift"], [("MODEL", "MODEL")]),
    "EmptyHunyuanLatentVideo": ([], ["width", "height", "length", "batch_size"], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")],
                 ["seed", "!control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
                 [("LATENT", "LATENT")]),
    "KSamplerAdvanced": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                          ("latent_image", "LATENT")],
                         ["add_noise", "noise_seed", "!control_after_generate", "steps", "cfg", "sampler_name",
                          "scheduler", "start_at_step", "end_at_step", "return_with_leftover_noise"],
                         [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
    "SaveAnimatedWEBP": ([("images", "IMAGE")], ["filename_prefix", "fps", "lossless", "quality", "method"], []),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "SparseVDiTLoadStrategy": ([], ["strategy_name"], [("strategy", STRATEGY), ("info", "STRING")]),
    "SparseVDiTApplyStrategy": ([("model", "MODEL"), ("strategy", STRATEGY)], ["force_reference"],
                                [("model", "MODEL")]),
    "SparseVDiTStrategyInfo": ([("strategy", STRATEGY)], ["frames", "height", "width"],
                               [("image", "IMAGE"), ("summary", "STRING")]),
    "SparseVDiTSearch": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                          ("latent", "LATENT")],
                         ["seed", "steps", "cfg", "sampler_name", "scheduler", "budget", "value",
                          "filename_prefix", "resume"],
                         [("strategy", STRATEGY), ("dense_latent", "LATENT"), ("info", "STRING")]),
    "SparseVDiTCompare": ([("dense", "IMAGE"), ("sparse", "IMAGE")], [], [("summary", "STRING"), ("plot", "IMAGE")]),
    "SparseVDiTLoadModel": ([], ["model_name", "weight_dtype"], [("model", "SPARSE_VDIT_DIFFUSERS_MODEL")]),
    "SparseVDiTSampler": ([("model", "SPARSE_VDIT_DIFFUSERS_MODEL"), ("positive", "CONDITIONING"),
                           ("negative", "CONDITIONING"), ("strategy", STRATEGY), ("latent", "LATENT")],
                          ["width", "height", "frames", "steps", "cfg", "shift", "seed"], [("latent", "LATENT")]),
    "SparseVDiTDecode": ([("latent", "LATENT")], ["vae_name", "tiled"], [("images", "IMAGE")]),
}

WAN_MODEL = "wan2.1_t2v_14B_bf16.safetensors"
WAN_TEXT = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN_VAE = "wan_2.1_vae.safetensors"
PROMPT = "a red fox running through fresh snow in a pine forest, morning light, cinematic"
NEGATIVE = "blurry, low quality, static, distorted"


def wan_inputs(first_id: int = 1) -> list:
    """Wan2.1 T2V 14B loaders, prompts and an 81-frame 480p latent (ids first_id .. first_id+6)."""
    i = first_id
    return [
        (i, "UNETLoader", {"unet_name": WAN_MODEL, "weight_dtype": "default"}, {}),
        (i + 1, "ModelSamplingSD3", {"shift": 8.0}, {"model": (i, 0)}),
        (i + 2, "CLIPLoader", {"clip_name": WAN_TEXT, "type": "wan", "device": "default"}, {}),
        (i + 3, "CLIPTextEncode", {"text": PROMPT}, {"clip": (i + 2, 0)}),
        (i + 4, "CLIPTextEncode", {"text": NEGATIVE}, {"clip": (i + 2, 0)}),
        (i + 5, "VAELoader", {"vae_name": WAN_VAE}, {}),
        (i + 6, "EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 81, "batch_size": 1}, {}),
    ]


def ksampler(node_id, model, positive, negative, latent, seed=42, steps=30, cfg=6.0):
    widgets = {"seed": seed, "!control_after_generate": "fixed", "steps": steps, "cfg": cfg,
               "sampler_name": "uni_pc", "scheduler": "simple", "denoise": 1.0}
    return (node_id, "KSampler", widgets, {"model": model, "positive": positive, "negative": negative,
                                           "latent_image": latent})


def save_webp(node_id, images, prefix):
    return (node_id, "SaveAnimatedWEBP", {"filename_prefix": prefix, "fps": 16.0, "lossless": False,
                                          "quality": 90, "method": "default"}, {"images": images})


WORKFLOWS = {
    "wan21_t2v_sparse": wan_inputs() + [
        (8, "SparseVDiTLoadStrategy", {"strategy_name": "wan2.1_t2v_14B_480p_81f.safetensors"}, {}),
        (9, "SparseVDiTApplyStrategy", {"force_reference": False}, {"model": (2, 0), "strategy": (8, 0)}),
        ksampler(10, (9, 0), (4, 0), (5, 0), (7, 0)),
        (11, "VAEDecode", {}, {"samples": (10, 0), "vae": (6, 0)}),
        save_webp(12, (11, 0), "sparse_vdit/wan21"),
    ],
    "hunyuan_video_t2v_sparse": [
        (1, "UNETLoader", {"unet_name": "hunyuan_video_t2v_720p_bf16.safetensors", "weight_dtype": "default"}, {}),
        (2, "ModelSamplingSD3", {"shift": 7.0}, {"model": (1, 0)}),
        (3, "DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "llava_llama3_fp8_scaled.safetensors",
                               "type": "hunyuan_video", "device": "default"}, {}),
        (4, "CLIPTextEncode", {"text": PROMPT}, {"clip": (3, 0)}),
        (5, "FluxGuidance", {"guidance": 6.0}, {"conditioning": (4, 0)}),
        (6, "CLIPTextEncode", {"text": ""}, {"clip": (3, 0)}),
        (7, "VAELoader", {"vae_name": "hunyuan_video_vae_bf16.safetensors"}, {}),
        (8, "EmptyHunyuanLatentVideo", {"width": 848, "height": 480, "length": 73, "batch_size": 1}, {}),
        (9, "SparseVDiTLoadStrategy", {"strategy_name": "hunyuan_video_t2v_720p_480p_73f.safetensors"}, {}),
        (10, "SparseVDiTApplyStrategy", {"force_reference": False}, {"model": (2, 0), "strategy": (9, 0)}),
        ksampler(11, (10, 0), (5, 0), (6, 0), (8, 0), steps=30, cfg=1.0),
        (12, "VAEDecode", {}, {"samples": (11, 0), "vae": (7, 0)}),
        save_webp(13, (12, 0), "sparse_vdit/hunyuan"),
    ],
    "wan21_search_strategy": wan_inputs() + [
        (8, "SparseVDiTSearch", {"seed": 42, "steps": 30, "cfg": 6.0, "sampler_name": "uni_pc",
                                 "scheduler": "simple", "budget": "target speedup", "value": 2.0,
                                 "filename_prefix": "wan2.1_t2v_14B_480p_81f", "resume": True},
         {"model": (2, 0), "positive": (4, 0), "negative": (5, 0), "latent": (7, 0)}),
        (9, "SparseVDiTStrategyInfo", {"frames": 0, "height": 0, "width": 0}, {"strategy": (8, 0)}),
        (10, "PreviewImage", {}, {"images": (9, 0)}),
        (11, "SparseVDiTApplyStrategy", {"force_reference": False}, {"model": (2, 0), "strategy": (8, 0)}),
        ksampler(12, (11, 0), (4, 0), (5, 0), (7, 0)),
        (13, "VAEDecode", {}, {"samples": (12, 0), "vae": (6, 0)}),
        (14, "VAEDecode", {}, {"samples": (8, 1), "vae": (6, 0)}),
        (15, "SparseVDiTCompare", {}, {"dense": (14, 0), "sparse": (13, 0)}),
        (16, "PreviewImage", {}, {"images": (15, 1)}),
        save_webp(17, (13, 0), "sparse_vdit/wan21_searched"),
    ],
    "wan21_compare_dense_sparse": wan_inputs() + [
        (8, "SparseVDiTLoadStrategy", {"strategy_name": "wan2.1_t2v_14B_480p_81f.safetensors"}, {}),
        (9, "SparseVDiTApplyStrategy", {"force_reference": False}, {"model": (2, 0), "strategy": (8, 0)}),
        ksampler(10, (2, 0), (4, 0), (5, 0), (7, 0)),
        ksampler(11, (9, 0), (4, 0), (5, 0), (7, 0)),
        (12, "VAEDecode", {}, {"samples": (10, 0), "vae": (6, 0)}),
        (13, "VAEDecode", {}, {"samples": (11, 0), "vae": (6, 0)}),
        (14, "SparseVDiTCompare", {}, {"dense": (12, 0), "sparse": (13, 0)}),
        (15, "PreviewImage", {}, {"images": (14, 1)}),
    ],
    # Wan2.2 A14B: two expert models, one strategy each, the steps split by KSamplerAdvanced
    "wan22_t2v_a14b_two_experts": [
        (1, "UNETLoader", {"unet_name": "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "weight_dtype": "default"}, {}),
        (2, "ModelSamplingSD3", {"shift": 8.0}, {"model": (1, 0)}),
        (3, "UNETLoader", {"unet_name": "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", "weight_dtype": "default"}, {}),
        (4, "ModelSamplingSD3", {"shift": 8.0}, {"model": (3, 0)}),
        (5, "CLIPLoader", {"clip_name": WAN_TEXT, "type": "wan", "device": "default"}, {}),
        (6, "CLIPTextEncode", {"text": PROMPT}, {"clip": (5, 0)}),
        (7, "CLIPTextEncode", {"text": NEGATIVE}, {"clip": (5, 0)}),
        (8, "VAELoader", {"vae_name": WAN_VAE}, {}),
        (9, "EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 81, "batch_size": 1}, {}),
        (10, "SparseVDiTLoadStrategy", {"strategy_name": "wan2.2_t2v_high_noise_480p_81f.safetensors"}, {}),
        (11, "SparseVDiTLoadStrategy", {"strategy_name": "wan2.2_t2v_low_noise_480p_81f.safetensors"}, {}),
        (12, "SparseVDiTApplyStrategy", {"force_reference": False}, {"model": (2, 0), "strategy": (10, 0)}),
        (13, "SparseVDiTApplyStrategy", {"force_reference": False}, {"model": (4, 0), "strategy": (11, 0)}),
        (14, "KSamplerAdvanced", {"add_noise": "enable", "noise_seed": 42, "!control_after_generate": "fixed",
                                  "steps": 20, "cfg": 3.5, "sampler_name": "euler", "scheduler": "simple",
                                  "start_at_step": 0, "end_at_step": 10, "return_with_leftover_noise": "enable"},
         {"model": (12, 0), "positive": (6, 0), "negative": (7, 0), "latent_image": (9, 0)}),
        (15, "KSamplerAdvanced", {"add_noise": "disable", "noise_seed": 42, "!control_after_generate": "fixed",
                                  "steps": 20, "cfg": 3.5, "sampler_name": "euler", "scheduler": "simple",
                                  "start_at_step": 10, "end_at_step": 10000, "return_with_leftover_noise": "disable"},
         {"model": (13, 0), "positive": (6, 0), "negative": (7, 0), "latent_image": (14, 0)}),
        (16, "VAEDecode", {}, {"samples": (15, 0), "vae": (8, 0)}),
        save_webp(17, (16, 0), "sparse_vdit/wan22"),
    ],
    "cogvideox15_t2v_diffusers": [
        (1, "SparseVDiTLoadModel", {"model_name": "diffusers/CogVideoX1.5-5B", "weight_dtype": "bf16"}, {}),
        (2, "CLIPLoader", {"clip_name": "t5xxl_fp16.safetensors", "type": "ltxv", "device": "default"}, {}),
        (3, "CLIPTextEncode", {"text": PROMPT}, {"clip": (2, 0)}),
        (4, "CLIPTextEncode", {"text": NEGATIVE}, {"clip": (2, 0)}),
        (5, "SparseVDiTLoadStrategy", {"strategy_name": "cogvideox1.5_5b_768x1360_81f.safetensors"}, {}),
        (6, "SparseVDiTSampler", {"width": 1360, "height": 768, "frames": 81, "steps": 50, "cfg": 6.0,
                                  "shift": 0.0, "seed": 42},
         {"model": (1, 0), "positive": (3, 0), "negative": (4, 0), "strategy": (5, 0)}),
        (7, "SparseVDiTDecode", {"vae_name": "diffusers/CogVideoX1.5-5B", "tiled": True}, {"latent": (6, 0)}),
        save_webp(8, (7, 0), "sparse_vdit/cogvideox15"),
    ],
}


def to_api(nodes) -> dict:
    """API format: {id: {class_type, inputs: {name: value | [source id, slot]}, _meta}}."""
    out = {}
    for node_id, node_type, widgets, links in nodes:
        inputs = {k: v for k, v in widgets.items() if not k.startswith("!")}
        inputs.update({name: [str(src), slot] for name, (src, slot) in links.items()})
        out[str(node_id)] = {"class_type": node_type, "inputs": inputs, "_meta": {"title": node_type}}
    return out


def to_ui(nodes) -> dict:
    """UI (LiteGraph) format with one link record per connection, nodes laid out on a grid."""
    links, by_target = [], {}
    for node_id, _type, _widgets, node_links in nodes:
        for name, (src, slot) in node_links.items():
            src_type = SPECS[next(t for i, t, _w, _l in nodes if i == src)][2][slot][1]
            links.append([len(links) + 1, src, slot, node_id, name, src_type])
            by_target[(node_id, name)] = len(links)
    ui_nodes = []
    for order, (node_id, node_type, widgets, _node_links) in enumerate(nodes):
        sockets, widget_names, outputs = SPECS[node_type]
        inputs = []
        for slot, (name, socket_type) in enumerate(sockets):
            link = by_target.get((node_id, name))
            inputs.append({"name": name, "type": socket_type, "link": link})
        for link in links:
            if link[3] == node_id:
                link[4] = next(s for s, (n, _t) in enumerate(sockets) if n == link[4])
        ui_nodes.append({
            "id": node_id, "type": node_type, "pos": [40 + 360 * (order % 5), 60 + 320 * (order // 5)],
            "size": [320, 130], "flags": {}, "order": order, "mode": 0, "inputs": inputs,
            "outputs": [{"name": name, "type": t, "slot_index": slot,
                         "links": [lk[0] for lk in links if lk[1] == node_id and lk[2] == slot]}
                        for slot, (name, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": node_type},
            "widgets_values": [widgets[w] for w in widget_names if w in widgets],
        })
    return {"last_node_id": max(n[0] for n in nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def render() -> dict[str, str]:
    """Relative path -> file text, for every workflow in both formats."""
    files = {}
    for name, nodes in WORKFLOWS.items():
        files[f"{name}.json"] = json.dumps(to_ui(nodes), indent=1) + "\n"
        files[f"api/{name}.json"] = json.dumps(to_api(nodes), indent=1) + "\n"
    return files


if __name__ == "__main__":
    for rel, text in render().items():
        path = os.path.join(HERE, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        print("wrote", path)
