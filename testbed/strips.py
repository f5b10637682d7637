"""PNG strips of videos: one row per video, its frames left to right, upscaled with nearest pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

LABEL_HEIGHT = 12


def video_strip(videos: torch.Tensor, labels: Sequence[str] | None = None, scale: int = 4) -> Image.Image:
    """An RGB image of `videos` `[B, 3, F, H, W]` in [-1, 1]: row b holds video b's F frames,
    each `scale` times larger, under its label when `labels` is given."""
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos must be [B, 3, F, H, W], got shape {tuple(videos.shape)}")
    if labels is not None and len(labels) != videos.shape[0]:
        raise ValueError(f"{len(labels)} labels for {videos.shape[0]} videos")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    pixels = ((videos.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    b, _, f, h, w = pixels.shape
    rows = pixels.permute(0, 3, 2, 4, 1).reshape(b, h, f * w, 3)  # frames side by side
    rows = rows.repeat_interleave(scale, 1).repeat_interleave(scale, 2).numpy()
    label_h = LABEL_HEIGHT if labels is not None else 0
    row_h = rows.shape[1] + label_h
    canvas = np.full((b * row_h, rows.shape[2], 3), 255, dtype=np.uint8)
    for i in range(b):
        canvas[i * row_h + label_h : (i + 1) * row_h] = rows[i]
    image = Image.fromarray(canvas)
    if labels is not None:
        draw = ImageDraw.Draw(image)
        for i, label in enumerate(labels):
            draw.text((2, i * row_h), label, fill=(0, 0, 0))
    return image


def save_strip(path: str | Path, videos: torch.Tensor, labels: Sequence[str] | None = None, scale: int = 4) -> Path:
    """Write `video_strip(...)` as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    video_strip(videos, labels, scale).save(path)
    return path
