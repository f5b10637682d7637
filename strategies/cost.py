"""The hardware cost model: what each candidate pattern costs on this machine at one geometry.

On a CUDA GPU with Triton, for fp16/bf16 heads of dim 64 or 128, a candidate's cost is measured: one layer of ``heads`` heads all using
the pattern runs through the kernels' Triton backend, and the median time is divided by the number
of heads. Results are cached as JSON under ``~/.cache/sparse_vdit/cost`` (or
``$SPARSE_VDIT_CACHE``) per (GPU name, geometry, heads, head_dim, dtype). Elsewhere the cost is
FLOP-proportional: the plan's tile density times the dense cost (dense = 1.0 per head).
A skipped head costs 0. Dense layers run the model's own SDPA: ``dense_layer`` is its time; a dense
head of a mixed layer runs there too (``LayerPlan.run``), so it costs ``dense_layer / heads``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from .geometry import VideoGeometry
from .patterns import Dense, Skip

GEOM_FIELDS = ("frames", "height", "width", "prefix", "suffix")


def cache_dir() -> str:
    """Folder of the on-disk cost cache."""
    root = os.environ.get("SPARSE_VDIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparse_vdit")
    return os.path.join(root, "cost")


def default_tiles(head_dim: int, device: torch.device) -> tuple[int, int]:
    """The kernels' preferred (block_m, block_n); 64x64 where the Triton kernel does not run (no
    Triton, or a head_dim it does not support: the reference backend takes any tiles)."""
    try:
        from ..kernels import preferred_tiles

        return tuple(preferred_tiles(head_dim, device))  # type: ignore[return-value]
    except (ImportError, ValueError):
        return (64, 64)


@dataclass
class CostModel:
    """Per-head cost of patterns at one geometry; ``measured`` says whether they are GPU times."""

    geometry: VideoGeometry
    heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16
    device: str = "cpu"
    measure: bool | None = None  # None: measure when on CUDA with Triton
    repeats: int = 10

    def __post_init__(self):
        if self.heads < 1 or self.head_dim < 1:
            raise ValueError(f"cost model needs heads >= 1 and head_dim >= 1, got {self.heads}, {self.head_dim}")
        dev = torch.device(self.device)
        if self.measure is None:
            # the Triton kernel runs fp16/bf16 at head_dim 64/128; other models (the fp32 testbed)
            # run the reference backend, whose cost is the FLOP count
            self.measure = (dev.type == "cuda" and torch.cuda.is_available() and _has_triton()
                            and self.dtype in (torch.float16, torch.bfloat16) and self.head_dim in (64, 128))
        self.tiles = default_tiles(self.head_dim, dev)
        self.gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" and torch.cuda.is_available() else "cpu"
        self.unit = "ms" if self.measure else "dense=1"
        self._costs: dict = {}
        self._dense_layer: float | None = None
        self._path = os.path.join(cache_dir(), self._cache_key() + ".json") if self.measure else None
        if self._path and os.path.isfile(self._path):
            try:
                with open(self._path) as f:
                    data = json.load(f)
                self._dense_layer = data.get("dense_layer")
                self._costs = {k: float(v) for k, v in data.get("costs", {}).items()}
            except (OSError, ValueError):
                self._costs = {}

    def _cache_key(self) -> str:
        g = self.geometry
        desc = json.dumps([self.gpu, [getattr(g, k) for k in GEOM_FIELDS], self.heads, self.head_dim,
                           str(self.dtype), list(self.tiles)])
        return hashlib.sha256(desc.encode()).hexdigest()[:20]

    def _save(self) -> None:
        if not self._path:
            return
        os.makedirs(os.path.dirname(self._path), exist_ok=True)
        tmp = self._path + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"gpu": self.gpu, "geometry": [getattr(self.geometry, k) for k in GEOM_FIELDS],
                       "heads": self.heads, "head_dim": self.head_dim, "dtype": str(self.dtype),
                       "dense_layer": self._dense_layer, "costs": self._costs}, f, indent=1)
        os.replace(tmp, self._path)

    # -------------------------------------------------------------------------------- costs

    def cost(self, pattern) -> float:
        """Predicted time of ONE head of one layer using ``pattern`` (unit: ``self.unit``)."""
        if isinstance(pattern, Skip):
            return 0.0
        if isinstance(pattern, Dense) and self.measure:  # a mixed layer's dense heads run on SDPA
            return self.dense_layer() / self.heads
        key = json.dumps(pattern.to_dict(), sort_keys=True)
        if key not in self._costs:
            self._costs[key] = self._measure(pattern) if self.measure else self._flop_cost(pattern)
            self._save()
        return self._costs[key]

    def costs(self, patterns: Iterable) -> torch.Tensor:
        """float64 tensor of :meth:`cost` for each pattern."""
        return torch.tensor([self.cost(p) for p in patterns], dtype=torch.float64)

    def dense_layer(self) -> float:
        """Time of one all-dense layer as the model runs it (SDPA), in ``self.unit``."""
        if self._dense_layer is None:
            self._dense_layer = self._measure_sdpa() if self.measure else float(self.heads)
            self._save()
        return self._dense_layer

    def layer_time(self, patterns: Sequence | None) -> float:
        """Predicted time of one layer: SDPA when all heads are dense (``None`` too), else the sum
        of per-head costs (one kernel launch runs all heads)."""
        if patterns is None or all(isinstance(p, Dense) for p in patterns):
            return self.dense_layer()
        return sum(self.cost(p) for p in patterns)

    def _flop_cost(self, pattern) -> float:
        from .plan import compile_layer

        if isinstance(pattern, Dense):
            return 1.0
        plan = compile_layer((pattern,), self.geometry, self.tiles[0], self.tiles[1], torch.device("cpu"))
        return float(plan.tile_density)

    def _inputs(self):
        L = self.geometry.seq_len
        gen = torch.Generator(device=self.device).manual_seed(0)
        shape = (1, self.heads, L, self.head_dim)
        return [torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype) for _ in range(3)]

    def _measure(self, pattern) -> float:
        from .plan import compile_layer

        plan = compile_layer((pattern,) * self.heads, self.geometry, self.tiles[0], self.tiles[1],
                             torch.device(self.device))
        q, k, v = self._inputs()
        return _median_ms(lambda: plan.run(q, k, v, layout="bhld", backend="triton"), self.repeats) / self.heads

    def _measure_sdpa(self) -> float:
        q, k, v = self._inputs()
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return _median_ms(lambda: sdpa(q, k, v), self.repeats)

    # -------------------------------------------------------------------------------- predictions

    def predict(self, strategy, sigmas: Sequence[float]) -> dict:
        """Predicted attention time of a whole run over ``sigmas`` (one forward per sigma), the
        all-dense time, and their ratio ``attention_speedup``."""
        sparse = dense = 0.0
        layer_cache: dict = {}
        for sigma in sigmas:
            for layer in range(strategy.layers):
                pats = strategy.patterns_for(float(sigma), layer)
                key = None if pats is None else tuple(pats)
                if key not in layer_cache:
                    layer_cache[key] = self.layer_time(key)
                sparse += layer_cache[key]
                dense += self.dense_layer()
        return {"attention_time": sparse, "dense_time": dense, "unit": self.unit,
                "attention_speedup": dense / sparse if sparse > 0 else float("inf")}


def amdahl(attention_speedup: float, attention_share: float) -> float:
    """End-to-end speedup when a fraction ``attention_share`` of the dense time is attention."""
    if not 0.0 <= attention_share <= 1.0:
        raise ValueError(f"attention_share must be in [0, 1], got {attention_share}")
    if attention_speedup <= 0:
        raise ValueError(f"attention_speedup must be > 0, got {attention_speedup}")
    return 1.0 / ((1.0 - attention_share) + attention_share / attention_speedup)


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401

        return True
    except ImportError:
        return False


def _median_ms(fn, repeats: int) -> float:
    fn()  # compile / warm up
    torch.cuda.synchronize()
    times = []
    for _ in range(max(3, repeats)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]
