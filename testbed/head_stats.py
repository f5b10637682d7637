"""Per-head attention statistics of a model while it samples: evidence of learned structure.

`HeadStatistics` is a controller (DESIGN.md section 7): every self-attention call runs dense as
usual, and for a fixed subset of query rows it also computes the softmax attention in float32 and
accumulates, per (layer, head):

- local: attention mass inside the 3D window |df| <= 1, |dy| <= 2, |dx| <= 2 (locality);
- same_frame: mass on keys of the query's own frame;
- temporal: mass on keys at the same place (|dy|, |dx| <= 1) in *other* frames (correspondence);
- columns: mass on the 2% of keys that receive the most attention over the sampled queries
  (global columns / vertical stripes; uniform attention gives 0.02);
- entropy: row entropy over log(L) (1 = uniform attention).

It also keeps the attention row of the query at the centre of the middle frame, as a
[frames, height, width] map per head.
"""

from __future__ import annotations

import math

import torch

from ..strategies.geometry import VideoGeometry

STATS = ("local", "same_frame", "temporal", "columns", "entropy")
TOP_COLUMNS = 0.02


def grid_call_views(controller, tensors, layer: int, geometry: VideoGeometry, layout: str) -> tuple:
    """`tensors` of one self-attention call as [B, H, L, D] views, after checking what a measuring
    controller (with `layers` and `heads`) handles: a known layout, a grid-only sequence, its layer
    range and head count; ValueError naming the mismatch otherwise."""
    name = type(controller).__name__
    if layout not in ("bhld", "blhd"):
        raise ValueError(f"unknown layout {layout!r}")
    if geometry.prefix or geometry.suffix:
        raise ValueError(f"{name} handles grid-only sequences (no prefix/suffix tokens)")
    if not 0 <= layer < controller.layers:
        raise ValueError(f"layer {layer} outside 0..{controller.layers - 1}")
    views = tuple(t if layout == "bhld" else t.transpose(1, 2) for t in tensors)
    if views[0].shape[1] != controller.heads:
        raise ValueError(f"{views[0].shape[1]} heads, expected {controller.heads}")
    return views


class HeadStatistics:
    """Controller that accumulates per-head attention statistics and returns dense attention."""

    def __init__(self, layers: int, heads: int, query_stride: int = 7):
        if query_stride < 1:
            raise ValueError(f"query_stride must be >= 1, got {query_stride}")
        self.layers, self.heads, self.query_stride = layers, heads, query_stride
        self.sums = torch.zeros(layers, heads, len(STATS), dtype=torch.float64)
        self.counts = torch.zeros(layers, dtype=torch.float64)
        self.centre_maps: torch.Tensor | None = None  # [layers, heads, F, H, W]

    def attention(self, q, k, v, *, layer, sigma, geometry: VideoGeometry, layout, dense, kv_len=None):
        qh, kh = grid_call_views(self, (q, k), layer, geometry, layout)
        self._accumulate(qh.float(), kh.float(), layer, geometry)
        return dense(q, k, v)

    def _accumulate(self, q: torch.Tensor, k: torch.Tensor, layer: int, geom: VideoGeometry) -> None:
        F, H, W, P = geom.frames, geom.height, geom.width, geom.tokens_per_frame
        L = geom.grid_tokens
        centre = (F // 2) * P + (H // 2) * W + W // 2
        rows = torch.unique(torch.cat([torch.arange(0, L, self.query_stride), torch.tensor([centre])])).to(q.device)
        probs = torch.softmax(q[:, :, rows] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # [B, h, R, L]
        g = torch.arange(L, device=q.device)
        f, y, x = g // P, (g % P) // W, g % W
        df = (f[rows, None] - f[None]).abs()
        dy = (y[rows, None] - y[None]).abs()
        dx = (x[rows, None] - x[None]).abs()
        masks = [
            (df <= 1) & (dy <= 2) & (dx <= 2),
            df == 0,
            (df >= 1) & (dy <= 1) & (dx <= 1),
        ]
        values = [(probs * m).sum(-1).mean(-1) for m in masks]  # each [B, h]
        received = probs.mean(2)  # [B, h, L]
        top = max(1, round(TOP_COLUMNS * L))
        values.append(received.topk(top, dim=-1).values.sum(-1))
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean(-1) / math.log(L)
        values.append(entropy)
        self.sums[layer] += torch.stack(values, -1).mean(0).double().cpu()
        self.counts[layer] += 1
        row = probs[:, :, (rows == centre).nonzero()[0, 0]].mean(0).double().cpu().view(-1, F, H, W)
        if self.centre_maps is None:
            self.centre_maps = torch.zeros(self.layers, self.heads, F, H, W, dtype=torch.float64)
        self.centre_maps[layer] += row

    def table(self) -> torch.Tensor:
        """Mean statistics `[layers, heads, len(STATS)]` over every recorded call."""
        if (self.counts == 0).any():
            raise ValueError("HeadStatistics: some layers recorded no attention call")
        return self.sums / self.counts[:, None, None]

    def maps(self) -> torch.Tensor:
        """Mean centre-query attention maps `[layers, heads, F, H, W]`."""
        if self.centre_maps is None:
            raise ValueError("HeadStatistics: no attention call recorded")
        return self.centre_maps / self.counts[:, None, None, None, None]


def stats_markdown(table: torch.Tensor) -> str:
    """A markdown table, one row per (layer, head)."""
    lines = ["| layer | head | " + " | ".join(STATS) + " |", "|---|---|" + "---|" * len(STATS)]
    for layer in range(table.shape[0]):
        for head in range(table.shape[1]):
            cells = " | ".join(f"{v:.3f}" for v in table[layer, head].tolist())
            lines.append(f"| {layer} | {head} | {cells} |")
    return "\n".join(lines) + "\n"


def maps_image(maps: torch.Tensor, scale: int = 3):
    """A PIL image of the centre-query maps: one row per (layer, head), the frames left to right,
    each map normalised to its own maximum (sqrt for contrast)."""
    from PIL import Image

    layers, heads, F, H, W = maps.shape
    flat = maps.reshape(layers * heads, F, H, W)
    norm = (flat / flat.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)).sqrt()
    gap = 1
    canvas = torch.ones(layers * heads * (H + gap), F * (W + gap))
    for r in range(layers * heads):
        for fr in range(F):
            canvas[r * (H + gap) : r * (H + gap) + H, fr * (W + gap) : fr * (W + gap) + W] = 1 - norm[r, fr]
    pixels = (canvas * 255).round().to(torch.uint8).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return Image.fromarray(pixels.numpy(), mode="L")
