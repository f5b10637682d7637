"""Does a video show its prompt? Colour and direction-of-motion checks on pixel videos.

A pixel "has" a palette colour when it is within COLOUR_RADIUS (RGB distance, [0, 1] scale) of it
and no other palette colour is nearer. A video's colour is right when the prompt's colour covers
the most pixels. Its motion is judged from the centroid of the prompt-colour pixels: the mean
position over the last third of the frames minus that over the first third must point the
prompted way by more than MIN_TRAVEL pixels ("moving ..."; the procedural shapes travel >= 8),
stay under SPIN_TRAVEL ("spinning": drift and camera pan move it up to ~6), or the centroid's
vertical range must exceed MIN_TRAVEL ("bouncing"). Its shape is the one of SHAPES whose
silhouette, fitted per frame to the prompt-colour pixels (centre at their centroid, rotation and
size searched), overlaps them best (mean intersection over union over the frames).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import math

import torch

from .data import COLOURS, DIRECTIONS, SHAPES, Prompt, as_prompt, shape_sdf

COLOUR_RADIUS = 0.35
MIN_TRAVEL = 3.0
SPIN_TRAVEL = 7.0
SHAPE_MIN_PIXELS = 6  # frames with fewer prompt-colour pixels are not fitted
_ANGLES = torch.arange(24) * (math.pi / 24)  # [0, pi) covers every shape's symmetry
_SCALES = torch.linspace(0.7, 1.8, 12)  # radius / sqrt(area / pi)


@dataclass(frozen=True)
class Adherence:
    colour_right: bool
    motion_right: bool | None  # None when the prompt colour is absent (nothing to track)
    travel: tuple[float, float]  # (dx, dy) of the prompt-colour centroid, last third - first third
    shape_right: bool | None = None  # None when no frame has SHAPE_MIN_PIXELS prompt-colour pixels


def _palette_masks(video: torch.Tensor) -> dict[str, torch.Tensor]:
    rgb = (video.float() + 1) / 2  # [3, F, H, W]
    names = list(COLOURS)
    palette = torch.tensor([COLOURS[n] for n in names])  # [C, 3]
    distance = (rgb[None] - palette[:, :, None, None, None]).norm(dim=1)  # [C, F, H, W]
    nearest = distance.argmin(0)
    return {n: (nearest == i) & (distance[i] < COLOUR_RADIUS) for i, n in enumerate(names)}


def shape_scores(mask: torch.Tensor) -> torch.Tensor | None:
    """Per shape of SHAPES, the mean over frames of its best IoU with a `[F, H, W]` boolean mask,
    fitting the silhouette's rotation and size with its centre at the mask's centroid; None when no
    frame has SHAPE_MIN_PIXELS pixels."""
    frames, h, w = mask.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    n_shapes, n_angles, n_scales = len(SHAPES), len(_ANGLES), len(_SCALES)
    shape = torch.arange(n_shapes).repeat_interleave(n_angles * n_scales)
    angle = _ANGLES.repeat_interleave(n_scales).repeat(n_shapes)
    scale = _SCALES.repeat(n_shapes * n_angles)
    c, s = torch.cos(angle)[:, None, None, None], torch.sin(angle)[:, None, None, None]
    best = []
    for m in mask:
        area = float(m.sum())
        if area < SHAPE_MIN_PIXELS:
            continue
        dx, dy = xs - float((m * xs).sum()) / area, ys - float((m * ys).sum()) / area
        u, v = c * dx + s * dy, -s * dx + c * dy
        radius = (scale * math.sqrt(area / math.pi))[:, None, None, None]
        inside = shape_sdf(shape, u, v, radius)[:, 0] < 0  # [shapes x angles x scales, H, W]
        iou = (inside & m).sum((1, 2)) / (inside | m).sum((1, 2)).clamp_min(1)
        best.append(iou.view(n_shapes, -1).amax(1))
    return torch.stack(best).mean(0) if best else None


def check_video(video: torch.Tensor, prompt: Prompt | str) -> Adherence:
    """Adherence of one `[3, F, H, W]` video in [-1, 1] to its prompt."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, F, H, W], got {tuple(video.shape)}")
    prompt = as_prompt(prompt)
    masks = _palette_masks(video)
    counts = {n: int(m.sum()) for n, m in masks.items()}
    colour_right = counts[prompt.colour] > 0 and max(counts, key=counts.get) == prompt.colour
    scores = shape_scores(masks[prompt.colour])
    shape_right = None if scores is None else SHAPES[int(scores.argmax())] == prompt.shape
    mask = masks[prompt.colour].float()  # [F, H, W]
    frames, h, w = mask.shape
    area = mask.sum((1, 2))
    third = max(1, frames // 3)
    if (area[:third] == 0).all() or (area[-third:] == 0).all():
        return Adherence(colour_right, None, (0.0, 0.0), shape_right)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    cx = (mask * xs).sum((1, 2)) / area.clamp_min(1)
    cy = (mask * ys).sum((1, 2)) / area.clamp_min(1)
    seen = area > 0

    def mean(values: torch.Tensor, part: slice) -> float:
        return float(values[part][seen[part]].mean())

    dx = mean(cx, slice(frames - third, frames)) - mean(cx, slice(0, third))
    dy = mean(cy, slice(frames - third, frames)) - mean(cy, slice(0, third))
    if prompt.motion in DIRECTIONS:
        ux, uy = DIRECTIONS[prompt.motion]
        right = dx * ux + dy * uy > MIN_TRAVEL
    elif prompt.motion == "spinning":
        right = (dx * dx + dy * dy) ** 0.5 < SPIN_TRAVEL
    else:  # bouncing
        right = float(cy[seen].max() - cy[seen].min()) > MIN_TRAVEL
    return Adherence(colour_right, bool(right), (dx, dy), shape_right)


def check_videos(videos: torch.Tensor, prompts: Sequence[Prompt | str]) -> list[Adherence]:
    """`check_video` for each of `[B, 3, F, H, W]` videos."""
    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
    return [check_video(v, p) for v, p in zip(videos, prompts)]
