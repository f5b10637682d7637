"""The method: video geometry, the pattern vocabulary, the plan compiler, the Strategy and the
engine every attention call site uses. Public API (see docs/api.md)."""

from .engine import SparseEngine, sdpa_dense
from .geometry import VideoGeometry
from .patterns import (FAMILIES, Dense, Diagonal, LocalWindow, MultiDiagonal, Pattern, Skip, Union,
                       VerticalStripe, pattern_for_density, pattern_from_dict)
from .plan import LayerPlan, clear_plans, compile_layer, pool_bytes
from .strategy import Strategy

__all__ = ["VideoGeometry", "Pattern", "Dense", "Skip", "Diagonal", "MultiDiagonal", "LocalWindow",
           "VerticalStripe", "Union", "FAMILIES", "pattern_for_density", "pattern_from_dict",
           "compile_layer", "LayerPlan", "pool_bytes", "clear_plans", "Strategy", "SparseEngine",
           "sdpa_dense"]
