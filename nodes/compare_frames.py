"""Dense vs sparse frames: PSNR and SSIM per frame, a summary line and a plot (no comfy import)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .strategy_view import image_tensor

_SSIM_C1, _SSIM_C2 = 0.01 ** 2, 0.03 ** 2


def _check_pair(reference: torch.Tensor, test: torch.Tensor) -> None:
    if reference.dim() != 4 or reference.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected IMAGE frames [N, H, W, C], got shape {tuple(reference.shape)}")
    if reference.shape != test.shape:
        raise ValueError(f"the two videos differ in shape: {tuple(reference.shape)} vs {tuple(test.shape)}; "
                         "decode both at the same size and frame count")


def psnr_per_frame(reference: torch.Tensor, test: torch.Tensor) -> list[float]:
    """PSNR in dB of each frame of two IMAGE batches in [0, 1] (inf for identical frames)."""
    _check_pair(reference, test)
    mse = ((reference.double() - test.double()) ** 2).flatten(1).mean(1)
    return [math.inf if m == 0 else 10.0 * math.log10(1.0 / float(m)) for m in mse]


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_per_frame(reference: torch.Tensor, test: torch.Tensor) -> list[float]:
    """SSIM (Gaussian 11x11, sigma 1.5, averaged over channels) of each frame."""
    _check_pair(reference, test)
    x = reference.double().permute(0, 3, 1, 2)
    y = test.double().permute(0, 3, 1, 2)
    n, c, h, w = x.shape
    size = min(11, h, w)
    window = _gaussian_window(size).expand(c, 1, size, size)

    def blur(t):
        return F.conv2d(t, window, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2
    cov = blur(x * y) - mx * my
    ssim_map = ((2 * mx * my + _SSIM_C1) * (2 * cov + _SSIM_C2)) / \
               ((mx ** 2 + my ** 2 + _SSIM_C1) * (vx + vy + _SSIM_C2))
    return [float(v) for v in ssim_map.flatten(1).mean(1)]


def summary(psnr: list[float], ssim: list[float]) -> str:
    """One line: mean / worst PSNR and SSIM over the frames."""
    finite = [p for p in psnr if math.isfinite(p)]
    mean_psnr = sum(finite) / len(finite) if finite else math.inf
    worst = min(psnr)
    return (f"{len(psnr)} frames: PSNR mean {mean_psnr:.2f} dB, worst {worst:.2f} dB; "
            f"SSIM mean {sum(ssim) / len(ssim):.4f}, worst {min(ssim):.4f}")


def plot(psnr: list[float], ssim: list[float], width: int = 512, height: int = 256) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: PSNR per frame (blue, left scale) and SSIM per frame (orange, 0..1)."""
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    left, right, top, bottom = 40, width - 10, 20, height - 20
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    finite = [p for p in psnr if math.isfinite(p)] or [0.0]
    lo, hi = min(finite + [20.0]), max(finite + [50.0])
    n = len(psnr)

    def x_at(i):
        return left + (right - left) * (i / max(n - 1, 1))

    def y_at(value, low, high):
        value = min(max(value, low), high)
        return bottom - (bottom - top) * (value - low) / (high - low)

    draw.line([(x_at(i), y_at(p if math.isfinite(p) else hi, lo, hi)) for i, p in enumerate(psnr)] * (1 if n > 1 else 2),
              fill=(66, 133, 244), width=2)
    draw.line([(x_at(i), y_at(s, 0.0, 1.0)) for i, s in enumerate(ssim)] * (1 if n > 1 else 2),
              fill=(251, 140, 0), width=2)
    draw.text((2, top - 14), f"PSNR {hi:.0f} dB", fill=(66, 133, 244))
    draw.text((2, bottom + 4), f"{lo:.0f} dB", fill=(66, 133, 244))
    draw.text((right - 120, top - 14), "SSIM (0..1)", fill=(251, 140, 0))
    draw.text((left, bottom + 4), f"frame 0..{n - 1}", fill=(0, 0, 0))
    return image_tensor(canvas)
