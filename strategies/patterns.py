"""The pattern vocabulary: token-level attention rules in geometric units (docs/DESIGN.md 2).

Every pattern is a frozen, hashable dataclass whose parameters are fractions of the grid (or frame
counts), so one pattern fits any video size. Shared rules for every pattern except Skip: non-grid
query rows attend every key, every query attends all non-grid keys and itself. Token radii are
`round(fraction * extent)` (Python's round).

`token_mask` is written directly from the coordinates (f, y, x) and never uses kernels/rule.py, so
tests can cross-check it against the 16-int rule that `head_rule` emits for the kernels.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..kernels import rule as R
from .geometry import VideoGeometry

# Most (query, interval) pairs the exact union count of `Union.density` handles at once; above it a
# strided sample of query rows is counted instead (see `Union.density`).
DENSITY_BUDGET = 2_000_000


def _fraction(pattern: str, field: str, value, upper: float | None = 1.0) -> float:
    """Validate a float parameter in [0, upper] (no upper bound when upper is None)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{pattern}.{field} must be a finite number, got {value!r}")
    value = float(value)
    if value < 0 or (upper is not None and value > upper):
        bound = f"in [0, {upper}]" if upper is not None else ">= 0"
        raise ValueError(f"{pattern}.{field} must be {bound}, got {value}")
    return value


def _count(pattern: str, field: str, value) -> int:
    """Validate a non-negative int parameter."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{pattern}.{field} must be an int >= 0, got {value!r}")
    return int(value)


def _coords(idx: torch.Tensor, geom: VideoGeometry) -> dict[str, torch.Tensor]:
    """Grid coordinates of logical token indices (meaningless where `grid` is False)."""
    g = idx - geom.prefix
    P, W = geom.tokens_per_frame, geom.width
    s = torch.remainder(g, P)
    return {"g": g, "grid": (g >= 0) & (g < geom.grid_tokens), "f": torch.div(g, P, rounding_mode="floor"),
            "s": s, "y": torch.div(s, W, rounding_mode="floor"), "x": torch.remainder(s, W)}


def _span(n: int, radius: int) -> np.ndarray:
    """For each position 0..n-1, how many positions of 0..n-1 lie within `radius` of it."""
    i = np.arange(n, dtype=np.int64)
    return np.minimum(n - 1, i + radius) - np.maximum(0, i - radius) + 1


class Pattern:
    """Base of every pattern: the shared rules around a grid rule each subclass defines."""

    name: ClassVar[str] = ""

    # --- what subclasses define ----------------------------------------------------------------
    def _grid_mask(self, q: dict, k: dict, geom: VideoGeometry) -> torch.Tensor:
        """bool [Q, K]: the grid-to-grid rule for coordinates q ([Q, 1]) and k ([1, K])."""
        raise NotImplementedError

    def _fill_rule(self, rule: list[int], geom: VideoGeometry) -> None:
        """Write this pattern's components into a 16-int rule row (fields start 'off')."""
        raise NotImplementedError

    def _intervals(self, g: np.ndarray, geom: VideoGeometry) -> tuple[np.ndarray, np.ndarray]:
        """Half-open grid-index intervals [start, end) of the keys each grid query g attends: [n, K]."""
        raise NotImplementedError

    def _grid_pair_count(self, geom: VideoGeometry) -> int:
        """Exact number of attended (grid query, grid key) pairs, self included."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description; `pattern_from_dict` inverts it."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        """Short text for UIs."""
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------------------
    def token_mask(self, geom: VideoGeometry, rows=None) -> torch.Tensor:
        """Exact bool mask [len(rows) or L, L] over logical tokens (the test oracle; small sizes)."""
        L = geom.seq_len
        keys = torch.arange(L)
        if rows is None:
            rows = keys
        rows = torch.as_tensor(rows).to(torch.int64).reshape(-1).cpu()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= L):
            raise ValueError(f"token_mask rows must lie in [0, {L}), got {int(rows.min())}..{int(rows.max())}")
        q, k = _coords(rows[:, None], geom), _coords(keys[None, :], geom)
        always = ~q["grid"] | ~k["grid"] | (rows[:, None] == keys[None, :])
        return always | (q["grid"] & k["grid"] & self._grid_mask(q, k, geom))

    def head_rule(self, geom: VideoGeometry) -> list[int]:
        """The 16-int kernel rule of this pattern at `geom` (ORDER 0, ROW_BASE 0: the plan sets them).

        Radii are clamped to the grid so equal masks give equal rules (and share plan tables).
        """
        rule = R.make_rule()
        self._fill_rule(rule, geom)
        return rule

    def density(self, geom: VideoGeometry) -> float:
        """Fraction of the L*L (query, key) pairs this pattern attends."""
        L, N = geom.seq_len, geom.grid_tokens
        other = L - N
        pairs = other * L + N * other + self._grid_pair_count(geom)
        return pairs / (L * L)

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class Dense(Pattern):
    """Every query attends every key."""

    name: ClassVar[str] = "dense"

    def _grid_mask(self, q, k, geom):
        return torch.ones(q["g"].shape[0], k["g"].shape[1], dtype=torch.bool)

    def _fill_rule(self, rule, geom):
        rule[R.DIAG] = geom.grid_tokens

    def _intervals(self, g, geom):
        return np.zeros((g.size, 1), np.int64), np.full((g.size, 1), geom.grid_tokens, np.int64)

    def _grid_pair_count(self, geom):
        return geom.grid_tokens ** 2

    def to_dict(self):
        return {"name": self.name}

    @property
    def label(self):
        return "dense"


@dataclass(frozen=True)
class Skip(Pattern):
    """The head's output is exactly zero; nothing is computed."""

    name: ClassVar[str] = "skip"

    def token_mask(self, geom, rows=None):
        return torch.zeros_like(super().token_mask(geom, rows))  # validates rows; attends nothing

    def _grid_mask(self, q, k, geom):
        return torch.zeros(q["g"].shape[0], k["g"].shape[1], dtype=torch.bool)

    def head_rule(self, geom):
        rule = super().head_rule(geom)
        rule[R.ORDER] = R.SKIP_HEAD
        return rule

    def _fill_rule(self, rule, geom):
        pass

    def density(self, geom):
        return 0.0

    def to_dict(self):
        return {"name": self.name}

    @property
    def label(self):
        return "skip"


@dataclass(frozen=True)
class Diagonal(Pattern):
    """A band in frame-major order: `|g_q - g_k| <= round(width * P)`; width in frames (half-width)."""

    width: float
    name: ClassVar[str] = "diagonal"

    def __post_init__(self):
        object.__setattr__(self, "width", _fraction("Diagonal", "width", self.width, upper=None))

    def radius(self, geom: VideoGeometry) -> int:
        """Half-width in grid tokens."""
        return round(self.width * geom.tokens_per_frame)

    def _grid_mask(self, q, k, geom):
        return (q["g"] - k["g"]).abs() <= self.radius(geom)

    def _fill_rule(self, rule, geom):
        rule[R.DIAG] = min(self.radius(geom), geom.grid_tokens)

    def _intervals(self, g, geom):
        r = self.radius(geom)
        return (np.maximum(0, g - r)[:, None], np.minimum(geom.grid_tokens, g + r + 1)[:, None])

    def _grid_pair_count(self, geom):
        return int(_span(geom.grid_tokens, self.radius(geom)).sum())

    def to_dict(self):
        return {"name": self.name, "width": self.width}

    @property
    def label(self):
        return f"diag ±{self.width:.3g}f"


@dataclass(frozen=True)
class MultiDiagonal(Pattern):
    """The same or nearby spatial positions in other frames.

    `|s_q - s_k| <= round(spatial * P)` and `|f_q - f_k| <= frames` (None: every frame).
    """

    spatial: float
    frames: int | None = None
    name: ClassVar[str] = "multi_diagonal"

    def __post_init__(self):
        object.__setattr__(self, "spatial", _fraction("MultiDiagonal", "spatial", self.spatial))
        if self.frames is not None:
            object.__setattr__(self, "frames", _count("MultiDiagonal", "frames", self.frames))

    def radii(self, geom: VideoGeometry) -> tuple[int, int]:
        """(spatial radius in tokens, frame radius), clamped to the grid."""
        frames = geom.frames if self.frames is None else min(self.frames, geom.frames)
        return min(round(self.spatial * geom.tokens_per_frame), geom.tokens_per_frame), frames

    def _grid_mask(self, q, k, geom):
        rs, rf = self.radii(geom)
        return ((q["s"] - k["s"]).abs() <= rs) & ((q["f"] - k["f"]).abs() <= rf)

    def _fill_rule(self, rule, geom):
        rule[R.MD_S], rule[R.MD_T] = self.radii(geom)

    def _intervals(self, g, geom):
        rs, rf = self.radii(geom)
        P, F = geom.tokens_per_frame, geom.frames
        f, s = g // P, g % P
        df = np.arange(-min(rf, F - 1), min(rf, F - 1) + 1)
        kf = f[:, None] + df[None, :]
        valid = (kf >= 0) & (kf < F)
        start = kf * P + np.maximum(0, s - rs)[:, None]
        end = kf * P + np.minimum(P, s + rs + 1)[:, None]
        return np.where(valid, start, 0), np.where(valid, end, 0)

    def _grid_pair_count(self, geom):
        rs, rf = self.radii(geom)
        return int(_span(geom.frames, rf).sum()) * int(_span(geom.tokens_per_frame, rs).sum())

    def to_dict(self):
        return {"name": self.name, "spatial": self.spatial, "frames": self.frames}

    @property
    def label(self):
        frames = "all f" if self.frames is None else f"±{self.frames}f"
        return f"mdiag ±{self.spatial:.3g}P {frames}"


@dataclass(frozen=True)
class LocalWindow(Pattern):
    """A 3D neighbourhood: `|df| <= frames`, `|dy| <= round(height*H)`, `|dx| <= round(width*W)`."""

    frames: int
    height: float
    width: float
    name: ClassVar[str] = "local_window"

    def __post_init__(self):
        object.__setattr__(self, "frames", _count("LocalWindow", "frames", self.frames))
        object.__setattr__(self, "height", _fraction("LocalWindow", "height", self.height))
        object.__setattr__(self, "width", _fraction("LocalWindow", "width", self.width))

    def radii(self, geom: VideoGeometry) -> tuple[int, int, int]:
        """(frame, row, column) radii, clamped to the grid."""
        return (min(self.frames, geom.frames), min(round(self.height * geom.height), geom.height),
                min(round(self.width * geom.width), geom.width))

    def _grid_mask(self, q, k, geom):
        rf, ry, rx = self.radii(geom)
        return (((q["f"] - k["f"]).abs() <= rf) & ((q["y"] - k["y"]).abs() <= ry)
                & ((q["x"] - k["x"]).abs() <= rx))

    def _fill_rule(self, rule, geom):
        rule[R.WIN_F], rule[R.WIN_Y], rule[R.WIN_X] = self.radii(geom)

    def _intervals(self, g, geom):
        rf, ry, rx = self.radii(geom)
        F, H, W, P = geom.frames, geom.height, geom.width, geom.tokens_per_frame
        f, y, x = g // P, (g % P) // W, g % W
        df = np.arange(-min(rf, F - 1), min(rf, F - 1) + 1)
        dy = np.arange(-min(ry, H - 1), min(ry, H - 1) + 1)
        kf = (f[:, None] + df[None, :])[:, :, None]
        ky = (y[:, None] + dy[None, :])[:, None, :]
        valid = (kf >= 0) & (kf < F) & (ky >= 0) & (ky < H)
        base = kf * P + ky * W
        start = np.where(valid, base + np.maximum(0, x - rx)[:, None, None], 0)
        end = np.where(valid, base + np.minimum(W, x + rx + 1)[:, None, None], 0)
        return start.reshape(g.size, -1), end.reshape(g.size, -1)

    def _grid_pair_count(self, geom):
        rf, ry, rx = self.radii(geom)
        return (int(_span(geom.frames, rf).sum()) * int(_span(geom.height, ry).sum())
                * int(_span(geom.width, rx).sum()))

    def to_dict(self):
        return {"name": self.name, "frames": self.frames, "height": self.height, "width": self.width}

    @property
    def label(self):
        return f"win ±{self.frames}f ±{self.height:.3g}H ±{self.width:.3g}W"


def _merge_ranges(ranges) -> tuple[tuple[float, float], ...]:
    """Sort and merge overlapping or touching (start, end) ranges."""
    merged: list[list[float]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple((a, b) for a, b in merged)


@dataclass(frozen=True)
class VerticalStripe(Pattern):
    """Global key columns: the first `round(first_frames * P)` grid tokens and up to three column
    ranges `(start, end)` given as fractions of the grid N (key-only rule)."""

    first_frames: float = 1.0
    columns: tuple[tuple[float, float], ...] = ()
    name: ClassVar[str] = "vertical_stripe"

    def __post_init__(self):
        object.__setattr__(self, "first_frames",
                           _fraction("VerticalStripe", "first_frames", self.first_frames, upper=None))
        try:
            pairs = [tuple(c) for c in self.columns]
        except TypeError:
            raise ValueError(f"VerticalStripe.columns must be (start, end) pairs, got {self.columns!r}") from None
        cols = []
        for pair in pairs:
            if len(pair) != 2:
                raise ValueError(f"VerticalStripe.columns must be (start, end) pairs, got {pair!r}")
            start = _fraction("VerticalStripe", "columns start", pair[0])
            end = _fraction("VerticalStripe", "columns end", pair[1])
            if start >= end:
                raise ValueError(f"VerticalStripe.columns range {pair!r} must have start < end")
            cols.append((start, end))
        cols = _merge_ranges(cols)
        if len(cols) > R.MAX_COLS:
            raise ValueError(f"VerticalStripe.columns holds at most {R.MAX_COLS} ranges, got {len(cols)}")
        object.__setattr__(self, "columns", cols)

    def key_ranges(self, geom: VideoGeometry) -> list[tuple[int, int]]:
        """The attended grid-index ranges [start, end): first tokens then columns (empty ones dropped)."""
        N = geom.grid_tokens
        first = min(round(self.first_frames * geom.tokens_per_frame), N)
        ranges = [(0, first)] + [(round(a * N), round(b * N)) for a, b in self.columns]
        return [(a, b) for a, b in ranges if b > a]

    def _grid_mask(self, q, k, geom):
        m = torch.zeros_like(k["g"], dtype=torch.bool)
        for a, b in self.key_ranges(geom):
            m |= (k["g"] >= a) & (k["g"] < b)
        return m.expand(q["g"].shape[0], -1)

    def _fill_rule(self, rule, geom):
        N = geom.grid_tokens
        rule[R.STRIPE_FIRST] = min(round(self.first_frames * geom.tokens_per_frame), N)
        cols = [(round(a * N), round(b * N)) for a, b in self.columns]
        cols = [(a, b) for a, b in cols if b > a]
        rule[R.N_COLS] = len(cols)
        for i, (a, b) in enumerate(cols):
            rule[R.COLS + 2 * i], rule[R.COLS + 2 * i + 1] = a, b

    def _intervals(self, g, geom):
        ranges = self.key_ranges(geom) or [(0, 0)]
        start = np.array([a for a, _ in ranges], np.int64)
        end = np.array([b for _, b in ranges], np.int64)
        return np.broadcast_to(start, (g.size, start.size)), np.broadcast_to(end, (g.size, end.size))

    def _grid_pair_count(self, geom):
        N = geom.grid_tokens
        keys = np.zeros(N, dtype=bool)
        for a, b in self.key_ranges(geom):
            keys[a:b] = True
        k = int(keys.sum())
        return N * k + (N - k)  # every query: the stripe keys, plus itself when it is not one

    def to_dict(self):
        return {"name": self.name, "first_frames": self.first_frames,
                "columns": [list(c) for c in self.columns]}

    @property
    def label(self):
        cols = f" +{len(self.columns)} cols" if self.columns else ""
        return f"stripe {self.first_frames:.3g}f{cols}"


_PRIMITIVES = (Dense, Diagonal, MultiDiagonal, LocalWindow, VerticalStripe)


def _dominates(a: Pattern, b: Pattern) -> bool:
    """True if same-kind pattern `a` attends everything `b` does at every geometry."""
    if isinstance(a, MultiDiagonal):
        fa = math.inf if a.frames is None else a.frames
        fb = math.inf if b.frames is None else b.frames
        return a.spatial >= b.spatial and fa >= fb
    if isinstance(a, LocalWindow):
        return a.frames >= b.frames and a.height >= b.height and a.width >= b.width
    return a.width >= b.width  # Diagonal


def _merge_same_kind(a: Pattern, b: Pattern) -> Pattern:
    """One pattern equal to `a OR b` for two patterns of the same kind, or ValueError."""
    if isinstance(a, (Dense, Diagonal, MultiDiagonal, LocalWindow)):
        if isinstance(a, Dense) or _dominates(a, b):
            return a
        if _dominates(b, a):
            return b
        raise ValueError(f"impossible Union: two different {type(a).__name__} boxes {a.label!r} and "
                         f"{b.label!r} (neither contains the other)")
    return VerticalStripe(max(a.first_frames, b.first_frames), a.columns + b.columns)


@dataclass(frozen=True, init=False)
class Union(Pattern):
    """OR of parts, at most one of each primitive kind (same-kind parts merged, Skip parts dropped)."""

    parts: tuple[Pattern, ...]
    name: ClassVar[str] = "union"

    def __init__(self, *parts: Pattern):
        by_kind: dict[type, Pattern] = {}
        stack = list(parts)
        while stack:
            p = stack.pop(0)
            if isinstance(p, Union):
                stack[:0] = list(p.parts)
                continue
            if isinstance(p, Skip):
                continue
            if not isinstance(p, _PRIMITIVES):
                raise ValueError(f"Union parts must be patterns, got {p!r}")
            kind = type(p)
            by_kind[kind] = _merge_same_kind(by_kind[kind], p) if kind in by_kind else p
        if not by_kind:
            raise ValueError("Union needs at least one part that is not Skip")
        if Dense in by_kind:
            by_kind = {Dense: by_kind[Dense]}
        object.__setattr__(self, "parts", tuple(by_kind[k] for k in _PRIMITIVES if k in by_kind))

    def _grid_mask(self, q, k, geom):
        m = self.parts[0]._grid_mask(q, k, geom)
        for p in self.parts[1:]:
            m = m | p._grid_mask(q, k, geom)
        return m

    def _fill_rule(self, rule, geom):
        for p in self.parts:
            p._fill_rule(rule, geom)

    def _intervals(self, g, geom):
        pieces = [p._intervals(g, geom) for p in self.parts]
        return (np.concatenate([a for a, _ in pieces], axis=1),
                np.concatenate([b for _, b in pieces], axis=1))

    def _grid_pair_count(self, geom):
        """Exact union of per-query key intervals; when N * intervals > DENSITY_BUDGET, the count is
        taken on a strided sample of grid queries (stride coprime to P, so every spatial position
        class is represented) and scaled to N."""
        if len(self.parts) == 1:
            return self.parts[0]._grid_pair_count(geom)
        N, P = geom.grid_tokens, geom.tokens_per_frame
        per_row = self._intervals(np.zeros(1, np.int64), geom)[0].shape[1] + 1
        stride = max(1, -(-N * per_row // DENSITY_BUDGET))
        while stride > 1 and math.gcd(stride, P) != 1:
            stride += 1
        g = np.arange(0, N, stride, dtype=np.int64)
        start, end = self._intervals(g, geom)
        start = np.concatenate([start, g[:, None]], axis=1)  # every query attends itself
        end = np.concatenate([end, g[:, None] + 1], axis=1)
        order = np.argsort(start, axis=1, kind="stable")
        start, end = np.take_along_axis(start, order, 1), np.take_along_axis(end, order, 1)
        reach = np.maximum.accumulate(end, axis=1)
        prev = np.concatenate([np.full((g.size, 1), -1, np.int64), reach[:, :-1]], axis=1)
        covered = np.clip(end - np.maximum(start, prev), 0, None).sum()
        return int(round(covered * N / g.size))

    def to_dict(self):
        return {"name": self.name, "parts": [p.to_dict() for p in self.parts]}

    @property
    def label(self):
        return " + ".join(p.label for p in self.parts)


PATTERN_CLASSES = {c.name: c for c in (Dense, Skip, Diagonal, MultiDiagonal, LocalWindow, VerticalStripe, Union)}


def pattern_from_dict(d: dict) -> Pattern:
    """Rebuild a pattern from `to_dict` output; ValueError on an unknown name or bad fields."""
    if not isinstance(d, dict) or not isinstance(d.get("name"), str):
        raise ValueError(f"a pattern dict needs a 'name' string, got {d!r}")
    fields = {k: v for k, v in d.items() if k != "name"}
    cls = PATTERN_CLASSES.get(d["name"])
    if cls is None:
        raise ValueError(f"unknown pattern name {d['name']!r}; known: {sorted(PATTERN_CLASSES)}")
    if cls is Union:
        parts = fields.pop("parts", None)
        if fields or not isinstance(parts, list):
            raise ValueError(f"a union dict has exactly one field 'parts' (a list), got {d!r}")
        return Union(*(pattern_from_dict(p) for p in parts))
    if cls is VerticalStripe and isinstance(fields.get("columns"), list):
        fields["columns"] = tuple(tuple(c) if isinstance(c, list) else c for c in fields["columns"])
    try:
        return cls(**fields)
    except TypeError as exc:
        raise ValueError(f"bad fields for pattern {d['name']!r}: {exc}") from None


FAMILIES = ("diagonal", "multi_diagonal", "local_window", "vertical_stripe")


def _closest(make, hi: int, target: float, geom: VideoGeometry) -> tuple[Pattern, float]:
    """Bisect an integer knob 0..hi whose pattern density grows with it; closest to `target`."""
    lo, top = 0, hi
    while lo < top:
        mid = (lo + top) // 2
        if make(mid).density(geom) < target:
            lo = mid + 1
        else:
            top = mid
    best = [make(i) for i in {max(0, lo - 1), lo}]
    p = min(best, key=lambda p: abs(p.density(geom) - target))
    return p, abs(p.density(geom) - target)


def pattern_for_density(family: str, density: float, geom: VideoGeometry) -> Pattern:
    """The pattern of `family` (one of FAMILIES) whose token density at `geom` is closest to `density`.

    diagonal: the band width; multi_diagonal: the spatial width over all frames; local_window: the
    row/column fraction at the smallest frame radius whose full-frame window reaches the target;
    vertical_stripe: the number of leading grid tokens.
    """
    target = _fraction("pattern_for_density", "density", density)
    P, N, F = geom.tokens_per_frame, geom.grid_tokens, geom.frames
    if family == "diagonal":
        return _closest(lambda r: Diagonal(r / P), N, target, geom)[0]
    if family == "multi_diagonal":
        return _closest(lambda r: MultiDiagonal(r / P), P, target, geom)[0]
    if family == "vertical_stripe":
        return _closest(lambda n: VerticalStripe(n / P), N, target, geom)[0]
    if family == "local_window":
        wf = next((f for f in range(F) if LocalWindow(f, 1.0, 1.0).density(geom) >= target), F - 1)
        side = max(geom.height, geom.width)
        return _closest(lambda r: LocalWindow(wf, r / side, r / side), side, target, geom)[0]
    raise ValueError(f"unknown pattern family {family!r}; known: {FAMILIES}")
