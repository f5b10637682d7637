"""Pure-torch reference of the sparse attention kernel: the test oracle and the explicit CPU path.

It reads only the head rules and the geometry of the tables (never their runs), evaluates the
exact rule of kernels/rule.py chunk by chunk over queries and runs a masked softmax in float32.
"""

from __future__ import annotations

import functools

import torch

from .rule import ORDER, ROW_BASE, SKIP_HEAD, rule_mask
from .tables import KernelTables

# Largest mask chunk (query rows x keys) materialised at once.
MAX_CHUNK_ELEMENTS = 64 * 1024 * 1024
# Whole masks up to this size (L x L) are kept per (rule, geometry): the CPU path calls the same
# few rules on every layer and step, and building a mask costs more than using it.
CACHED_MASK_ELEMENTS = 16 * 1024 * 1024


@functools.lru_cache(maxsize=64)
def _whole_mask(rule: tuple, prefix: int, frames: int, height: int, width: int, length: int,
                device: str) -> torch.Tensor:
    keys = torch.arange(length, device=device)
    return rule_mask(list(rule), prefix, frames, height, width, keys, keys)


def to_bhld(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View a [B,H,L,D] or [B,L,H,D] tensor as [B,H,L,D] (no copy)."""
    if layout == "bhld":
        return x
    if layout == "blhd":
        return x.transpose(1, 2)
    raise ValueError(f"layout must be 'bhld' or 'blhd', got {layout!r}")


def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: KernelTables,
                               layout: str = "bhld", kv_len: torch.Tensor | None = None,
                               scale: float | None = None) -> torch.Tensor:
    """Sparse attention by the head rules of `tables`, in float32, output in q's dtype and layout.

    Keys at positions >= kv_len[b] are masked; skip heads and query rows with no attended key give 0.
    """
    qb, kb, vb = (to_bhld(t, layout) for t in (q, k, v))
    B, H, L, D = qb.shape
    if scale is None:
        scale = D ** -0.5
    out = torch.zeros(qb.shape, dtype=torch.float32, device=q.device)
    rules = tables.head_rules.cpu().tolist()
    geom = (tables.prefix, tables.frames, tables.height, tables.width)
    keys = torch.arange(L, device=q.device)
    lengths = [L] * B if kv_len is None else [int(n) for n in kv_len.cpu().tolist()]
    chunk = max(1, MAX_CHUNK_ELEMENTS // L)
    for h, rule in enumerate(rules):
        if rule[ORDER] == SKIP_HEAD:
            continue
        for start in range(0, L, chunk):
            rows = keys[start:start + chunk]
            if L * L <= CACHED_MASK_ELEMENTS:
                key = tuple(0 if i == ROW_BASE else x for i, x in enumerate(rule))  # pool offset: no part of the mask
                allowed = _whole_mask(key, *geom, L, str(q.device))[start:start + chunk]
            else:
                allowed = rule_mask(rule, *geom, rows, keys)
            for b in range(B):
                mask = allowed & (keys < lengths[b])[None, :]
                s = (qb[b, h, start:start + chunk].float() @ kb[b, h].float().T) * scale
                s = s.masked_fill(~mask, float("-inf"))
                p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no key: 0
                out[b, h, start:start + chunk] = p @ vb[b, h].float()
    out = out.to(q.dtype)
    return out if layout == "bhld" else out.transpose(1, 2).contiguous()
