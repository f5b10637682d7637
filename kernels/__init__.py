"""Sparse attention kernels driven by per-head rules and block tables (docs/DESIGN.md 3-5).

Public API: `sparse_attention` (validated entry point), `supports` (why a tensor cannot use the
Triton path), `KernelTables`, the rule definition in `rule`, and `preferred_tiles`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .reference import sparse_attention_reference
from .rule import rule_mask
from .tables import KernelTables
from .tile_oracle import tables_from_rules

__all__ = ["sparse_attention", "supports", "check_qkv", "preferred_tiles", "KernelTables", "rule_mask",
           "sparse_attention_reference", "tables_from_rules"]

_LAYOUTS = ("bhld", "blhd")
MAX_TRITON_SEQ_LEN = 1 << 22  # the kernel's fp32 index division is exact below this
_BACKENDS = ("triton", "reference")


def preferred_tiles(head_dim: int, device=None) -> tuple[int, int]:
    """(block_m, block_n) for this head_dim on `device`: 128x64 where shared memory is large
    (Hopper / A100-class), 64x64 on ~100 KB consumer GPUs and the CPU interpreter."""
    if head_dim not in (64, 128):
        raise ValueError(f"head_dim must be 64 or 128, got {head_dim}")
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        return (64, 64)
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0)
    if smem >= 160 * 1024:
        return (128, 64)
    return (64, 64)


def supports(q: torch.Tensor) -> Optional[str]:
    """None when q can run on the Triton kernel, else the reason it cannot (device, dtype, head_dim)."""
    import os

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if q.device.type != "cuda" and not (interpret and q.device.type == "cpu"):
        return f"device {q.device} is not a CUDA GPU"
    # Triton's CPU interpreter computes bfloat16 wrongly; it gets float16 and float32 instead
    allowed = (torch.float16, torch.float32) if interpret else (torch.float16, torch.bfloat16)
    if q.dtype not in allowed:
        names = "/".join(str(d).replace("torch.", "") for d in allowed)
        return f"dtype {q.dtype} is not supported ({names}{' under TRITON_INTERPRET' if interpret else ''})"
    if q.shape[-1] not in (64, 128):
        return f"head_dim {q.shape[-1]} is not supported (64 or 128)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def check_qkv(q, k, v, layout: str) -> tuple[int, int, int]:
    """(batch, heads, length) of q/k/v in `layout`; ValueError naming any mismatch of layout,
    rank, shape, dtype or device between the three."""
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D ({layout}), got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != q shape {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} != q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    B = q.shape[0]
    H, L = (q.shape[1], q.shape[2]) if layout == "bhld" else (q.shape[2], q.shape[1])
    return B, H, L


def _check_inputs(q, k, v, tables: KernelTables, layout: str, kv_len) -> None:
    B, H, L = check_qkv(q, k, v, layout)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dimension must be contiguous (stride {t.stride(-1)})")
    tables.validate()
    if tables.device != q.device:
        raise ValueError(f"tables are on {tables.device}, q on {q.device}")
    if H != tables.heads:
        raise ValueError(f"q has {H} heads, tables have {tables.heads}")
    if L != tables.seq_len:
        raise ValueError(f"sequence length {L} != tables.seq_len {tables.seq_len}")
    if kv_len is not None:
        if not isinstance(kv_len, torch.Tensor) or kv_len.dtype != torch.int32 or kv_len.shape != (B,):
            raise ValueError(f"kv_len must be an int32 tensor of shape ({B},)")
        if kv_len.device != q.device:
            raise ValueError(f"kv_len is on {kv_len.device}, q on {q.device}")


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: KernelTables, *,
                     layout: str = "bhld", kv_len: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, backend: str = "triton") -> torch.Tensor:
    """Block-sparse attention of q/k/v ([B,H,L,D] or [B,L,H,D]) under `tables`.

    Returns a tensor of q's layout and dtype. Keys >= kv_len[b] are masked; skip heads give zeros.
    Raises ValueError on mismatched shapes, dtypes, devices, heads, length or an unsupported
    backend/tensor (use `supports` first to fall back to dense attention).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    _check_inputs(q, k, v, tables, layout, kv_len)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "reference":
        return sparse_attention_reference(q, k, v, tables, layout, kv_len, scale)
    reason = supports(q)
    if reason is not None:
        raise ValueError(f"triton backend unavailable: {reason}")
    if tables.seq_len >= MAX_TRITON_SEQ_LEN:
        raise ValueError(f"sequence length {tables.seq_len} exceeds the Triton kernel's {MAX_TRITON_SEQ_LEN}")
    from .triton_attention import triton_sparse_attention

    return triton_sparse_attention(q, k, v, tables, layout, kv_len, scale)
