"""VideoGeometry: the latent-patch grid of a video plus the non-grid tokens around it."""

from __future__ import annotations

import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class VideoGeometry:
    """Token layout `[prefix | grid frame-major (f, y, x) | suffix]` of one attention call.

    frames, height, width: the patch grid (F x H x W, all > 0). prefix / suffix: non-grid tokens
    before / after the grid (CogVideoX text first, HunyuanVideo text last, Wan reference tokens).
    Grid index `g = f*P + y*W + x`; logical token index `prefix + g`.
    """

    frames: int
    height: int
    width: int
    prefix: int = 0
    suffix: int = 0

    def __post_init__(self):
        for name in ("frames", "height", "width", "prefix", "suffix"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"VideoGeometry.{name} must be an int, got {value!r}")
            value = int(value)
            object.__setattr__(self, name, value)
            minimum = 1 if name in ("frames", "height", "width") else 0
            if value < minimum:
                raise ValueError(f"VideoGeometry.{name} must be >= {minimum}, got {value}")

    @property
    def tokens_per_frame(self) -> int:
        """P = H * W."""
        return self.height * self.width

    @property
    def grid_tokens(self) -> int:
        """N = F * P."""
        return self.frames * self.tokens_per_frame

    @property
    def seq_len(self) -> int:
        """L = prefix + N + suffix."""
        return self.prefix + self.grid_tokens + self.suffix

    def check_seq_len(self, seq_len: int) -> None:
        """Raise ValueError if a sequence of `seq_len` tokens does not have this layout."""
        if seq_len != self.seq_len:
            raise ValueError(
                f"sequence length {seq_len} does not match the geometry {self.describe()} "
                f"which has {self.seq_len} tokens")

    def describe(self) -> str:
        """Short text such as '21x45x80 (+226 before, +0 after)'."""
        return (f"{self.frames}x{self.height}x{self.width} "
                f"(+{self.prefix} before, +{self.suffix} after)")
