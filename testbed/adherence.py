"""Does a video show its prompt? Colour and direction-of-motion checks on pixel videos.

A pixel "has" a palette colour when it is within COLOUR_RADIUS (RGB distance, [0, 1] scale) of it
and no other palette colour is nearer. A video's colour is right when the prompt's colour covers
the most pixels. Its motion is judged from the centroid of the prompt-colour pixels: the mean
position over the last third of the frames minus that over the first third must point the
prompted way by more than MIN_TRAVEL pixels ("moving ..."; the procedural shapes travel >= 8),
stay under SPIN_TRAVEL ("spinning": drift and camera pan move it up to ~6), or the centroid's
vertical range must exceed MIN_TRAVEL ("bouncing").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .data import DIRECTIONS, COLOURS, Prompt, as_prompt

COLOUR_RADIUS = 0.35
MIN_TRAVEL = 3.0
SPIN_TRAVEL = 7.0


@dataclass(frozen=True)
class Adherence:
    colour_right: bool
    motion_right: bool | None  # None when the prompt colour is absent (nothing to track)
    travel: tuple[float, float]  # (dx, dy) of the prompt-colour centroid, last third - first third


def _palette_masks(video: torch.Tensor) -> dict[str, torch.Tensor]:
    rgb = (video.float() + 1) / 2  # [3, F, H, W]
    names = list(COLOURS)
    palette = torch.tensor([COLOURS[n] for n in names])  # [C, 3]
    distance = (rgb[None] - palette[:, :, None, None, None]).norm(dim=1)  # [C, F, H, W]
    nearest = distance.argmin(0)
    return {n: (nearest == i) & (distance[i] < COLOUR_RADIUS) for i, n in enumerate(names)}


def check_video(video: torch.Tensor, prompt: Prompt | str) -> Adherence:
    """Adherence of one `[3, F, H, W]` video in [-1, 1] to its prompt."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, F, H, W], got {tuple(video.shape)}")
    prompt = as_prompt(prompt)
    masks = _palette_masks(video)
    counts = {n: int(m.sum()) for n, m in masks.items()}
    colour_right = counts[prompt.colour] > 0 and max(counts, key=counts.get) == prompt.colour
    mask = masks[prompt.colour].float()  # [F, H, W]
    frames, h, w = mask.shape
    area = mask.sum((1, 2))
    third = max(1, frames // 3)
    if (area[:third] == 0).all() or (area[-third:] == 0).all():
        return Adherence(colour_right, None, (0.0, 0.0))
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
    return Adherence(colour_right, bool(right), (dx, dy))


def check_videos(videos: torch.Tensor, prompts: Sequence[Prompt | str]) -> list[Adherence]:
    """`check_video` for each of `[B, 3, F, H, W]` videos."""
    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
    return [check_video(v, p) for v, p in zip(videos, prompts)]
