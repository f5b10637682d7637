"""The testbed model: a small Wan2.1-architecture transformer working directly on pixels.

6 blocks of 4 heads x 128 (the head_dim ComfyUI's Wan loader assumes), text_dim 4096 and
freq_dim 256 (its defaults), in/out channels 3 (RGB, no VAE). Its trained weights ship in
`testbed/weights/` (diffusers format, bf16 shards under 16 MiB); `testbed/config.json` is the
architecture the training script builds.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..strategies.geometry import VideoGeometry
from .data import FRAMES, SIZE

CONFIG_FILE = Path(__file__).with_name("config.json")
WEIGHTS_DIR = Path(__file__).with_name("weights")
FLOW_SHIFT = 3.0  # the sigma shift used in training and sampling
MAX_SHARD = "15MB"


def model_config() -> dict:
    """The architecture as diffusers `WanTransformer3DModel` keyword arguments."""
    config = json.loads(CONFIG_FILE.read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_model(config: dict | None = None):
    """A randomly initialised fp32 testbed model (seed torch first for reproducible weights)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**(config or model_config()))


def testbed_geometry(config: dict | None = None) -> VideoGeometry:
    """The token grid of one testbed video: FRAMES latent frames of (SIZE / patch)^2 tokens."""
    pt, ph, pw = (config or model_config())["patch_size"]
    return VideoGeometry(frames=FRAMES // pt, height=SIZE // ph, width=SIZE // pw)


def load_testbed(weights_dir: str | Path = WEIGHTS_DIR, device="cpu", dtype=torch.float32):
    """The trained testbed model in eval mode; FileNotFoundError if `weights_dir` holds no weights."""
    from diffusers import WanTransformer3DModel

    weights_dir = Path(weights_dir)
    if not (weights_dir / "config.json").is_file() or not any(weights_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"no testbed weights (config.json + *.safetensors) in {weights_dir}")
    model = WanTransformer3DModel.from_pretrained(weights_dir, torch_dtype=dtype)
    return model.to(device).eval()


def save_testbed(model, out_dir: str | Path, dtype=torch.bfloat16) -> Path:
    """Write `model` (left untouched) to `out_dir` as diffusers safetensors shards < 16 MiB."""
    out_dir = Path(out_dir)
    copy.deepcopy(model).to("cpu", dtype).save_pretrained(out_dir, max_shard_size=MAX_SHARD, safe_serialization=True)
    return out_dir
