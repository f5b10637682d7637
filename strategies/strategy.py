"""Strategy: which pattern every head of every layer uses, per noise-level bucket (DESIGN.md 6).

Buckets are keyed on the noise level sigma, not on the step index, so a partial schedule or a
different step count still maps each step to the bucket of its noise level.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .geometry import VideoGeometry
from .patterns import Dense, Pattern


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Strategy.{name} must be an int >= 1, got {value!r}")
    return int(value)


def _sigma(name: str, value, allow_inf: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    if not ok or value < 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}number >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Strategy:
    """A pattern per (sigma bucket, layer, head), with an optional dense warm-up and dense layers.

    sigma_edges: descending; bucket i holds sigmas in (edges[i+1], edges[i]]; sigmas above the
    first edge use bucket 0, sigmas at or below the last edge the last bucket.
    dense_above_sigma: steps with sigma above it run dense (warm-up). dense_layers: always dense.
    meta: free-form metadata (the file format's header); not part of equality.
    """

    layers: int
    heads: int
    sigma_edges: tuple[float, ...]
    patterns: tuple[tuple[tuple[Pattern, ...], ...], ...]
    dense_above_sigma: float | None = None
    dense_layers: frozenset[int] = frozenset()
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("layers", _positive_int("layers", self.layers))
        set_("heads", _positive_int("heads", self.heads))
        try:
            edges = tuple(_sigma("Strategy.sigma_edges", e, allow_inf=True) for e in self.sigma_edges)
        except TypeError:
            raise ValueError(f"Strategy.sigma_edges must be a sequence of numbers, got {self.sigma_edges!r}") from None
        if len(edges) < 2 or any(a <= b for a, b in zip(edges, edges[1:])):
            raise ValueError(f"Strategy.sigma_edges must be strictly descending with at least 2 edges, got {edges}")
        set_("sigma_edges", edges)
        set_("_negated_inner_edges", tuple(-e for e in edges[1:-1]))  # for bisect in bucket_of
        buckets = len(edges) - 1
        table = self.patterns
        if not isinstance(table, (tuple, list)) or len(table) != buckets:
            raise ValueError(f"Strategy.patterns must hold {buckets} buckets (one per pair of sigma edges), "
                             f"got {len(table) if isinstance(table, (tuple, list)) else table!r}")
        rows = []
        for b, bucket in enumerate(table):
            if not isinstance(bucket, (tuple, list)) or len(bucket) != self.layers:
                raise ValueError(f"Strategy.patterns bucket {b} must hold {self.layers} layers")
            layers = []
            for l, heads in enumerate(bucket):
                if not isinstance(heads, (tuple, list)) or len(heads) != self.heads:
                    raise ValueError(f"Strategy.patterns bucket {b} layer {l} must hold {self.heads} head patterns")
                for h, p in enumerate(heads):
                    if not isinstance(p, Pattern):
                        raise ValueError(f"Strategy.patterns bucket {b} layer {l} head {h} is not a Pattern: {p!r}")
                layers.append(tuple(heads))
            rows.append(tuple(layers))
        set_("patterns", tuple(rows))
        if self.dense_above_sigma is not None:
            set_("dense_above_sigma", _sigma("Strategy.dense_above_sigma", self.dense_above_sigma))
        try:
            dense_layers = frozenset(self.dense_layers)
        except TypeError:
            raise ValueError(f"Strategy.dense_layers must be a set of layer indices, got {self.dense_layers!r}") from None
        for l in dense_layers:
            if isinstance(l, bool) or not isinstance(l, numbers.Integral) or not 0 <= l < self.layers:
                raise ValueError(f"Strategy.dense_layers holds {l!r}, not a layer index in [0, {self.layers})")
        set_("dense_layers", frozenset(int(l) for l in dense_layers))
        if not isinstance(self.meta, Mapping):
            raise ValueError(f"Strategy.meta must be a mapping, got {type(self.meta).__name__}")
        set_("meta", dict(self.meta))

    # ------------------------------------------------------------------------------ builders
    @classmethod
    def uniform(cls, pattern: Pattern, layers: int, heads: int, sigma_edges=(math.inf, 0.0),
                dense_above_sigma: float | None = None, dense_layers: Iterable[int] = (),
                meta: Mapping[str, Any] | None = None) -> "Strategy":
        """The same pattern for every head, layer and bucket."""
        layers, heads = _positive_int("layers", layers), _positive_int("heads", heads)
        if not isinstance(pattern, Pattern):
            raise ValueError(f"Strategy.uniform needs a Pattern, got {pattern!r}")
        buckets = len(tuple(sigma_edges)) - 1
        table = ((tuple([pattern] * heads),) * layers,) * max(buckets, 0)
        return cls(layers, heads, tuple(sigma_edges), table, dense_above_sigma, frozenset(dense_layers),
                   dict(meta or {}))

    @classmethod
    def dense(cls, layers: int, heads: int) -> "Strategy":
        """Every head dense: an engine running it is bit-identical to the unpatched model."""
        return cls.uniform(Dense(), layers, heads)

    def with_meta(self, **kw) -> "Strategy":
        """A copy with `kw` merged into meta."""
        return dataclasses.replace(self, meta={**self.meta, **kw})

    # ------------------------------------------------------------------------------ lookup
    @property
    def buckets(self) -> int:
        return len(self.sigma_edges) - 1

    def bucket_of(self, sigma: float) -> int:
        """The bucket whose (lower, upper] sigma range holds `sigma` (clamped to the first / last)."""
        sigma = _sigma("sigma", sigma, allow_inf=True)
        # edges descend: the bucket is the number of inner edges >= sigma
        return bisect.bisect_right(self._negated_inner_edges, -sigma)

    def runs_dense(self, sigma: float, layer: int) -> bool:
        """True where the warm-up or a dense layer makes this call dense (patterns aside)."""
        self._check_layer(layer)
        return layer in self.dense_layers or (self.dense_above_sigma is not None and sigma > self.dense_above_sigma)

    def patterns_for(self, sigma: float, layer: int) -> tuple[Pattern, ...] | None:
        """The layer's head patterns at noise level `sigma`, or None when the layer runs dense."""
        bucket = self.bucket_of(sigma)
        if self.runs_dense(sigma, layer):
            return None
        heads = self.patterns[bucket][layer]
        return None if all(isinstance(p, Dense) for p in heads) else heads

    def _check_layer(self, layer) -> None:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < self.layers:
            raise ValueError(f"layer {layer!r} is out of range: the strategy has {self.layers} layers")

    def density(self, geom: VideoGeometry, sigmas: Iterable[float]) -> float:
        """Mean token density of attention over a sampling schedule (the sigma of each model call):
        every layer and head weighs the same; dense steps and layers count as 1."""
        sigmas = list(sigmas)
        if not sigmas:
            raise ValueError("Strategy.density needs at least one sigma")
        cache: dict[Pattern, float] = {}
        total = 0.0
        for sigma in sigmas:
            for layer in range(self.layers):
                heads = self.patterns_for(sigma, layer)
                if heads is None:
                    total += 1.0
                    continue
                for p in heads:
                    if p not in cache:
                        cache[p] = p.density(geom)
                total += sum(cache[p] for p in heads) / self.heads
        return total / (len(sigmas) * self.layers)
