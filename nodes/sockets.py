"""Names every node shares: the category, the strategy socket type and its V3 io class."""

from comfy_api.latest import io

CATEGORY = "Sparse-vDiT"
STRATEGY_TYPE = "SPARSE_VDIT_STRATEGY"
Strategy = io.Custom(STRATEGY_TYPE)
