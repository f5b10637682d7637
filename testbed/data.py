"""Procedural videos and their prompts: the testbed's training data, rendered in pixel space.

A video shows one coloured shape doing what its prompt says ("large red square moving left"),
over a textured background that the camera may pan across, sometimes with a grey bar that passes
in front of or behind the shape (occlusion). Everything else (start position, speed, pan, bar, a
small tilt) is drawn at random from a seeded `torch.Generator`, so a (prompt, seed) pair always
gives the same video. Shapes stand upright within +-TILT radians, and spinning ones start so: a
uniformly random orientation made "square", "triangle" and "cross" mixtures over rotation, which the
small model averaged into round blobs. Videos are `[B, 3, FRAMES, SIZE, SIZE]` in [-1, 1]; with
the model's (1, 2, 2) patches that is 9 latent frames of 16 x 16 = 256 tokens.

Prompts become conditioning by a fixed rule: each word has its own random 4096-d vector (seeded
by the word's CRC32), the prompt is the sequence of its word vectors, zero-padded to TEXT_TOKENS
(the way Wan's umT5 conditioning is zero after the prompt); the empty prompt is all zeros.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import torch

FRAMES = 9
SIZE = 32
TEXT_TOKENS = 8
TEXT_DIM = 4096  # ComfyUI's Wan loader assumes a 4096-d text input

TILT = 0.2  # radians: the start orientation's range either side of upright
SIZES = {"small": (3.0, 4.5), "large": (6.0, 8.0)}  # shape radius range in pixels
COLOURS = {
    "red": (1.0, 0.15, 0.1),
    "green": (0.1, 0.85, 0.2),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "cyan": (0.1, 0.9, 0.9),
    "magenta": (0.9, 0.15, 0.85),
}
SHAPES = ("circle", "square", "triangle", "cross")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "bouncing", "spinning")
DIRECTIONS = {"moving left": (-1.0, 0.0), "moving right": (1.0, 0.0), "moving up": (0.0, -1.0), "moving down": (0.0, 1.0)}


@dataclass(frozen=True)
class Prompt:
    """One prompt of the vocabulary: `size colour shape motion`."""

    size: str
    colour: str
    shape: str
    motion: str

    def __post_init__(self):
        for value, allowed, what in (
            (self.size, SIZES, "size"),
            (self.colour, COLOURS, "colour"),
            (self.shape, SHAPES, "shape"),
            (self.motion, MOTIONS, "motion"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {sorted(allowed)}")
        if self.shape == "circle" and self.motion == "spinning":
            raise ValueError("'circle ... spinning' is not in the vocabulary: a spinning circle looks static")

    @property
    def text(self) -> str:
        return f"{self.size} {self.colour} {self.shape} {self.motion}"

    @classmethod
    def parse(cls, text: str) -> "Prompt":
        """Parse 'size colour shape motion'; ValueError naming the text if it is not in the vocabulary."""
        words = text.split()
        if len(words) < 4:
            raise ValueError(f"prompt {text!r} is not 'size colour shape motion'")
        return cls(words[0], words[1], words[2], " ".join(words[3:]))


ALL_PROMPTS: tuple[Prompt, ...] = tuple(
    Prompt(size, colour, shape, motion)
    for size in SIZES
    for colour in COLOURS
    for shape in SHAPES
    for motion in MOTIONS
    if not (shape == "circle" and motion == "spinning")
)

# Never seen in training: each colour, motion and size twice, each shape three times, so every
# word is known from other combinations. The quality harness and the sample strips use these.
HELD_OUT: tuple[Prompt, ...] = tuple(
    Prompt.parse(text)
    for text in (
        "large red square moving left",
        "small green circle moving right",
        "large blue triangle bouncing",
        "small yellow cross spinning",
        "large cyan circle moving up",
        "small magenta square moving down",
        "large yellow triangle moving right",
        "small red cross bouncing",
        "large green cross moving down",
        "small blue square spinning",
        "large magenta circle moving left",
        "small cyan triangle moving up",
    )
)
TRAIN_PROMPTS: tuple[Prompt, ...] = tuple(p for p in ALL_PROMPTS if p not in HELD_OUT)


def as_prompt(prompt: Prompt | str) -> Prompt:
    """`prompt` itself, or the parsed text."""
    return prompt if isinstance(prompt, Prompt) else Prompt.parse(prompt)


@functools.lru_cache(maxsize=None)
def word_embedding(word: str) -> torch.Tensor:
    """The fixed float32 [TEXT_DIM] vector of one vocabulary word (N(0, 1), seeded by CRC32; cached,
    do not modify it in place)."""
    generator = torch.Generator().manual_seed(zlib.crc32(word.encode()))
    return torch.randn(TEXT_DIM, generator=generator)


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """`x` (drawn on the CPU) on `device`; to a GPU through pinned memory without blocking, so the
    host queues the next training step instead of waiting for the GPU to drain (a pageable copy
    waits for every kernel queued before it)."""
    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.contiguous().pin_memory().to(device, non_blocking=True)  # pinning refuses expanded views


def prompt_embeddings(prompts: Sequence[Prompt | str], device="cpu") -> torch.Tensor:
    """Conditioning `[B, TEXT_TOKENS, TEXT_DIM]` float32: word vectors then zeros; '' is all zeros."""
    out = torch.zeros(len(prompts), TEXT_TOKENS, TEXT_DIM)
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) and prompt == "":
            continue
        for j, word in enumerate(as_prompt(prompt).text.split()):
            out[i, j] = word_embedding(word)
    return to_device(out, device)


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def shape_sdf(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance in pixels (negative inside) of each video's shape (index into SHAPES), in its
    own rotated frame (u, v) at radius r."""
    circle = torch.sqrt(u * u + v * v) - r
    square = torch.maximum(u.abs(), v.abs()) - 0.85 * r
    triangle = torch.stack(
        [u * math.cos(a) + v * math.sin(a) for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)]
    ).amax(0) - 0.5 * r
    arm = r / 3
    cross = torch.minimum(
        torch.maximum(u.abs() - r, v.abs() - arm), torch.maximum(u.abs() - arm, v.abs() - r)
    )
    every = torch.stack([circle, square, triangle, cross])  # [4, B, F, H, W]
    index = shape.view(1, -1, 1, 1, 1).expand(1, *every.shape[1:])
    return every.gather(0, index)[0]


def _coverage(sdf: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] from a signed distance in pixels."""
    return (0.5 - sdf).clamp(0.0, 1.0)


def render_videos(prompts: Sequence[Prompt | str], generator: torch.Generator, device="cpu") -> torch.Tensor:
    """Render one video per prompt, `[B, 3, FRAMES, SIZE, SIZE]` float32 in [-1, 1].

    Random draws come from `generator` (CPU) in a fixed order, then the frames are drawn on
    `device`, so the same generator state gives the same videos on any device."""
    if generator.device.type != "cpu":
        raise ValueError(f"render_videos needs a CPU torch.Generator, got one on {generator.device}")
    parsed = [as_prompt(p) for p in prompts]
    n = len(parsed)
    if n == 0:
        raise ValueError("render_videos needs at least one prompt")
    g = generator
    # every draw is made for every video whatever its prompt, so the sequence of draws is fixed by n
    radius_unit = torch.rand(n, generator=g)
    brightness = _uniform(g, n, 0.85, 1.0)
    centre = 15.5 + _uniform(g, 2 * n, -4.0, 4.0).view(n, 2)
    speed = _uniform(g, n, 1.8, 2.8)
    side_drift = _uniform(g, n, -0.3, 0.3)
    angle0 = _uniform(g, n, -TILT, TILT)
    spin = _uniform(g, n, 0.3, 0.5) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    spin_drift = _uniform(g, 2 * n, -0.5, 0.5).view(n, 2)
    bounce_height = _uniform(g, n, 8.0, 12.0)
    bounce_period = _uniform(g, n, 4.0, 6.0)
    bounce_phase = _uniform(g, n, 0.0, 6.0)
    bounce_vx = _uniform(g, n, -1.0, 1.0)
    pan = _uniform(g, 2 * n, -0.5, 0.5).view(n, 2) * (torch.rand(n, generator=g) < 0.5).float()[:, None]
    bg_level = _uniform(g, 3 * n, 0.1, 0.25).view(n, 3)
    bg_wave = _uniform(g, 4 * n, -1.0, 1.0).view(n, 2, 2)
    bg_wavelength = _uniform(g, 2 * n, 6.0, 14.0).view(n, 2)
    bg_phase = _uniform(g, 2 * n, 0.0, 2 * math.pi).view(n, 2)
    has_bar = torch.rand(n, generator=g) < 0.5
    bar_in_front = torch.rand(n, generator=g) < 0.5
    bar_half = torch.stack([_uniform(g, n, 2.0, 4.0), _uniform(g, n, 6.0, 12.0)], 1)
    bar_angle = _uniform(g, n, 0.0, math.pi)
    bar_centre = 15.5 + _uniform(g, 2 * n, -6.0, 6.0).view(n, 2)
    bar_velocity = _uniform(g, 2 * n, -2.0, 2.0).view(n, 2)
    bar_grey = _uniform(g, n, 0.45, 0.65)

    size_low = torch.tensor([SIZES[p.size][0] for p in parsed])
    size_high = torch.tensor([SIZES[p.size][1] for p in parsed])
    radius = size_low + (size_high - size_low) * radius_unit
    colour = torch.tensor([COLOURS[p.colour] for p in parsed]) * brightness[:, None]
    shape = torch.tensor([SHAPES.index(p.shape) for p in parsed])
    motion = [p.motion for p in parsed]

    t = torch.arange(FRAMES, dtype=torch.float32) - (FRAMES - 1) / 2  # centred frame time
    position = torch.empty(n, FRAMES, 2)
    angle = angle0[:, None].expand(n, FRAMES).clone()
    for i, m in enumerate(motion):
        if m in DIRECTIONS:
            dx, dy = DIRECTIONS[m]
            velocity = torch.tensor([dx * speed[i] - dy * side_drift[i], dy * speed[i] + dx * side_drift[i]])
            position[i] = centre[i] + velocity * t[:, None]
        elif m == "bouncing":
            ground = 15.5 + bounce_height[i] / 2
            height = bounce_height[i] * torch.sin(math.pi * (t + bounce_phase[i]) / bounce_period[i]).abs()
            position[i, :, 0] = centre[i, 0] + bounce_vx[i] * t
            position[i, :, 1] = ground - height
        else:  # spinning
            position[i] = centre[i] + spin_drift[i] * t[:, None]
            angle[i] = angle0[i] + spin[i] * t
    camera = pan[:, None, :] * t[None, :, None]  # [B, F, 2] camera offset in pixels
    screen = position - camera

    def to(x: torch.Tensor) -> torch.Tensor:
        return to_device(x, device)

    pix = torch.arange(SIZE, dtype=torch.float32, device=device)
    ys, xs = pix.view(1, 1, SIZE, 1), pix.view(1, 1, 1, SIZE)

    # background: two plane waves in world coordinates, so a camera pan shifts them
    wx = xs + to(camera[..., 0])[..., None, None]
    wy = ys + to(camera[..., 1])[..., None, None]
    waves = 0.0
    for w in range(2):
        direction = to(bg_wave[:, w])
        k = 2 * math.pi / to(bg_wavelength[:, w])
        phase = (direction[:, 0, None, None, None] * wx + direction[:, 1, None, None, None] * wy) * k[:, None, None, None]
        waves = waves + torch.sin(phase + to(bg_phase[:, w])[:, None, None, None])
    background = to(bg_level)[:, :, None, None, None] + 0.06 * waves[:, None]  # [B, 3, F, H, W]

    def local(centre_xy: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dx = xs - to(centre_xy[..., 0])[..., None, None]
        dy = ys - to(centre_xy[..., 1])[..., None, None]
        c, s = torch.cos(to(theta))[..., None, None], torch.sin(to(theta))[..., None, None]
        return c * dx + s * dy, -s * dx + c * dy

    u, v = local(screen, angle)
    shape_alpha = _coverage(shape_sdf(to(shape), u, v, to(radius)[:, None, None, None]))[:, None]

    bar_xy = bar_centre[:, None, :] + bar_velocity[:, None, :] * t[None, :, None] - camera
    bu, bv = local(bar_xy, bar_angle[:, None].expand(n, FRAMES))
    half = to(bar_half)
    bar_sdf = torch.maximum(bu.abs() - half[:, 0, None, None, None], bv.abs() - half[:, 1, None, None, None])
    bar_alpha = (_coverage(bar_sdf) * to(has_bar.float())[:, None, None, None])[:, None]
    front = to(bar_in_front.float())[:, None, None, None, None]
    grey = to(bar_grey)[:, None, None, None, None]

    video = background
    video = video + (grey - video) * bar_alpha * (1 - front)
    video = video + (to(colour)[:, :, None, None, None] - video) * shape_alpha
    video = video + (grey - video) * bar_alpha * front
    return (video * 2 - 1).clamp(-1.0, 1.0)


def training_batch(batch: int, generator: torch.Generator, device="cpu") -> tuple[torch.Tensor, list[Prompt]]:
    """A random batch of training videos and their prompts (drawn from TRAIN_PROMPTS only)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    picks = torch.randint(len(TRAIN_PROMPTS), (batch,), generator=generator).tolist()
    prompts = [TRAIN_PROMPTS[i] for i in picks]
    return render_videos(prompts, generator, device), prompts
