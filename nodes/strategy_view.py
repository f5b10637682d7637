"""What a strategy looks like: per-head modes, per-layer density, as JSON (web) and as an IMAGE.

No comfy import: the Strategy Info node and the ``/sparse_vdit/strategy_info`` route both use it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..strategies.file import strategy_summary
from ..strategies.patterns import Dense, Skip

# One colour per mode (RGB). The web viewer receives this palette from the route.
PALETTE = {
    "dense": (150, 150, 150),
    "skip": (20, 20, 20),
    "Diagonal": (66, 133, 244),
    "MultiDiagonal": (52, 168, 83),
    "LocalWindow": (251, 140, 0),
    "VerticalStripe": (171, 71, 188),
    "Union": (0, 172, 193),
}
OTHER = (230, 80, 80)


def pattern_mode(pattern: Any) -> str:
    """Mode name of a pattern: "dense", "skip", or its class name (Diagonal, Union, ...)."""
    if isinstance(pattern, Dense):
        return "dense"
    if isinstance(pattern, Skip):
        return "skip"
    return type(pattern).__name__


def mode_grid(strategy: Any) -> list[list[list[str]]]:
    """Mode name of every head: ``[bucket][head][layer]``; warm-up buckets and dense layers are
    "dense" since they run the model's own attention."""
    warm = strategy.dense_above_sigma
    grid = []
    for b, bucket in enumerate(strategy.patterns):
        dense_bucket = warm is not None and strategy.sigma_edges[b + 1] >= warm
        grid.append([["dense" if dense_bucket or layer in strategy.dense_layers
                      else pattern_mode(bucket[layer][head])
                      for layer in range(strategy.layers)] for head in range(strategy.heads)])
    return grid


MAX_SHOWN_BUCKETS = 6


def shown_buckets(count: int, limit: int = MAX_SHOWN_BUCKETS) -> list[int]:
    """At most ``limit`` sigma buckets spread evenly, first and last included (a searched strategy
    often has one bucket per step; drawing them all would make a very tall picture)."""
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


def view_data(strategy: Any, geometry: Any) -> dict:
    """JSON-safe description for the web viewer: modes, palette, per-layer density, summary;
    ``shown`` lists the buckets the pictures draw."""
    summary = strategy_summary(strategy, geometry)
    return {
        "shown": shown_buckets(len(strategy.patterns)),
        "layers": strategy.layers,
        "heads": strategy.heads,
        "sigma_edges": list(strategy.sigma_edges),
        "modes": mode_grid(strategy),
        "palette": {name: list(rgb) for name, rgb in PALETTE.items()},
        "layer_density": [row["density"] for row in summary["layers"]],
        "density": summary["density"],
        "geometry": [geometry.frames, geometry.height, geometry.width],
    }


def _scale(cells: int, target: int) -> int:
    return max(2, min(24, target // max(cells, 1)))


def render_view(data: dict, title: str = "") -> torch.Tensor:
    """ComfyUI IMAGE [1, H, W, 3] float in [0, 1]: one heads x layers panel per shown sigma
    bucket, then a bar per layer of its token density, then a legend."""
    layers, heads = data["layers"], data["heads"]
    cell = _scale(layers, 640)
    cell_h = max(2, min(cell, 240 // max(heads, 1)))
    width = max(layers * cell + 20, 360)
    pad, label_h, bar_h = 10, 14, 60
    n_buckets = len(data["shown"])
    panel_h = heads * cell_h
    legend_rows = len(PALETTE)
    height = pad + label_h + n_buckets * (panel_h + label_h) + bar_h + label_h + legend_rows * 12 + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 0), title or f"{layers} layers x {heads} heads, density {data['density']:.3f}",
              fill=(0, 0, 0))
    y = pad + label_h
    edges = data["sigma_edges"]
    for b in data["shown"]:
        bucket = data["modes"][b]
        draw.text((pad, y), f"sigma {edges[b + 1]:.3g}..{edges[b]:.3g}", fill=(0, 0, 0))
        y += label_h
        for h, row in enumerate(bucket):
            for l, mode in enumerate(row):
                x0, y0 = pad + l * cell, y + h * cell_h
                draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell_h - 1], fill=PALETTE.get(mode, OTHER))
        y += panel_h
    y += label_h // 2
    for l, dens in enumerate(data["layer_density"]):
        x0 = pad + l * cell
        top = y + int(round(bar_h * (1.0 - min(max(dens, 0.0), 1.0))))
        draw.rectangle([x0, top, x0 + max(cell - 2, 1), y + bar_h], fill=(66, 133, 244))
    draw.text((pad, y + bar_h), "token density per layer", fill=(0, 0, 0))
    y += bar_h + label_h
    for i, (name, rgb) in enumerate(PALETTE.items()):
        draw.rectangle([pad, y + i * 12 + 2, pad + 8, y + i * 12 + 10], fill=rgb)
        draw.text((pad + 12, y + i * 12), name, fill=(0, 0, 0))
    return image_tensor(canvas)


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A Pillow RGB image as a ComfyUI IMAGE batch of one."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)


def predicted_speedup(strategy: Any, geometry: Any, device: str = "cpu") -> tuple[float, str]:
    """Attention speedup the cost model predicts on ``device`` with one forward per sigma
    bucket (at its middle sigma), and the unit of the costs (measured GPU time or FLOP share)."""
    from ..strategies.cost import CostModel

    head_dim = int(((strategy.meta or {}).get("model") or {}).get("head_dim", 128))
    edges = strategy.sigma_edges
    sigmas = [(edges[b] + edges[b + 1]) / 2 for b in range(len(edges) - 1)]
    cost = CostModel(geometry=geometry, heads=strategy.heads, head_dim=head_dim, device=device)
    prediction = cost.predict(strategy, sigmas)
    return float(prediction["attention_speedup"]), str(prediction["unit"])


def describe(strategy: Any, data: dict, speedup: tuple[float, str] | None = None) -> str:
    """A few lines of text: size, buckets, warm-up, dense layers, density, predicted speedup."""
    lines = [
        f"{strategy.layers} layers x {strategy.heads} heads, {len(strategy.patterns)} sigma buckets",
        f"grid {'x'.join(str(g) for g in data['geometry'])}: token density {data['density']:.3f}",
        f"dense above sigma: {strategy.dense_above_sigma}",
        f"dense layers: {sorted(strategy.dense_layers) or 'none'}",
    ]
    if speedup is not None:
        lines.append(f"predicted attention speedup here: {speedup[0]:.2f}x (costs in {speedup[1]})")
    return "\n".join(lines)
