"""SparseEngine: the controller every attention call site hands q, k, v to (DESIGN.md 7)."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from .. import kernels
from .geometry import VideoGeometry
from .patterns import Dense
from .plan import LayerPlan, compile_layer
from .strategy import Strategy

BACKENDS = ("auto", "triton", "reference")


def sdpa_dense(layout: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Dense attention through torch SDPA for q, k, v in `layout` ("bhld" or "blhd"), same layout out."""
    if layout == "bhld":
        return F.scaled_dot_product_attention
    if layout == "blhd":
        def dense(q, k, v):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2)).transpose(1, 2)
        return dense
    raise ValueError(f"layout must be 'bhld' or 'blhd', got {layout!r}")


class SparseEngine:
    """Runs each attention call with the strategy's compiled plan, or `dense` where the strategy,
    the layer or the hardware says so.

    backend: "auto" / "triton" use the Triton kernel where `kernels.supports` allows it; elsewhere
    the call runs `dense` with one warning per reason, or the torch reference when
    force_reference=True. "reference" always uses the torch reference (the explicit CPU path).
    Plans are cached per (bucket, layer, geometry, device, head_dim): per call only dictionary
    lookups and the kernel launch remain.
    """

    def __init__(self, strategy: Strategy, *, backend: str = "auto", force_reference: bool = False):
        if not isinstance(strategy, Strategy):
            raise ValueError(f"SparseEngine needs a Strategy, got {type(strategy).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.strategy = strategy
        self.backend = backend
        self.force_reference = bool(force_reference)
        self._plans: dict[tuple, LayerPlan | None] = {}
        self._routes: dict[tuple, str | None] = {}   # (device, dtype, head_dim) -> backend or None
        self._warned: set[str] = set()

    @torch.compiler.disable
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layer: int, sigma: float,
                  geometry: VideoGeometry, layout: str, dense: Callable, kv_len: torch.Tensor | None = None):
        """Attention output of one layer's call, in q's layout and dtype.

        Raises ValueError on input that does not fit the strategy or geometry (call sites turn it
        into a dense fallback with one warning). torch.compile runs this method eagerly (a graph
        break): its routing depends on sigma and layer, which would otherwise recompile per step.
        """
        self._check(q, k, v, layer, sigma, geometry, layout)
        if self.strategy.runs_dense(sigma, layer):
            return dense(q, k, v)
        route = self._route(q)
        if route is None:
            return dense(q, k, v)
        plan = self.plan(layer, sigma, geometry, head_dim=q.shape[-1], device=q.device)
        if plan is None:
            return dense(q, k, v)
        return plan.run(q, k, v, layout=layout, kv_len=kv_len, backend=route, dense=dense)

    def plan(self, layer: int, sigma: float, geometry: VideoGeometry, head_dim: int = 128,
             device="cpu") -> LayerPlan | None:
        """The cached plan of the layer's patterns in the bucket of `sigma` (warm-up and dense layers
        aside), or None when every head is Dense."""
        device = torch.device(device)
        bucket = self.strategy.bucket_of(sigma)
        key = (bucket, layer, geometry, device, head_dim)
        if key not in self._plans:
            patterns = self.strategy.patterns[bucket][layer]
            if all(isinstance(p, Dense) for p in patterns):
                self._plans[key] = None
            else:
                tiles = kernels.preferred_tiles(head_dim, device) if head_dim in (64, 128) else (64, 64)
                self._plans[key] = compile_layer(patterns, geometry, *tiles, device)
        return self._plans[key]

    def _route(self, q: torch.Tensor) -> str | None:
        """Backend for tensors like q, or None for dense (warning once per reason)."""
        key = (q.device, q.dtype, q.shape[-1])
        if key not in self._routes:
            if self.backend == "reference":
                self._routes[key] = "reference"
            else:
                reason = kernels.supports(q)
                if reason is None:
                    self._routes[key] = "triton"
                elif self.force_reference:
                    self._routes[key] = "reference"
                else:
                    self._routes[key] = None
                    self._warn_once(f"Sparse-vDiT: {reason}; running dense attention instead")
        return self._routes[key]

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _check(self, q, k, v, layer, sigma, geometry, layout) -> None:
        if not isinstance(geometry, VideoGeometry):
            raise ValueError(f"geometry must be a VideoGeometry, got {type(geometry).__name__}")
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or math.isnan(sigma):
            raise ValueError(f"sigma must be a number, got {sigma!r}")
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) \
                or not 0 <= layer < self.strategy.layers:
            raise ValueError(f"layer {layer!r} is out of range: the strategy has {self.strategy.layers} layers")
        _batch, heads, length = kernels.check_qkv(q, k, v, layout)
        geometry.check_seq_len(length)
        if heads != self.strategy.heads:
            raise ValueError(f"q has {heads} heads, the strategy has {self.strategy.heads}")
