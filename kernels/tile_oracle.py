"""Brute-force KernelTables from head rules: every tile classified from the exact rule mask.

Slow (it evaluates the whole mask, one q-tile at a time) and independent of the plan compiler, so
it is the oracle for the compiler's tables and builds tables for tests and small benchmarks.
"""

from __future__ import annotations

import torch
from torch.nn.functional import pad

from .rule import CUBE, ORDER, ROW_BASE, RULE_INTS, SKIP_HEAD, cube_order_map, physical_to_logical, rule_mask
from .tables import KernelTables, q_tile_bounds


def _tile_runs(rule: list[int], geom: tuple[int, int, int, int], seq_len: int, q_bounds, block_n: int,
               device) -> list[list[tuple[int, int, int]]]:
    """Per q-tile (rows q_bounds[t]:q_bounds[t + 1]), the runs (k_start, k_end, full) of k-tiles
    with any attended pair."""
    logical = physical_to_logical(torch.arange(seq_len, device=device), rule[ORDER], *geom)
    n_k = -(-seq_len // block_n)
    pad_n = n_k * block_n - seq_len
    per_q_tile = []
    for start, end in zip(q_bounds[:-1].tolist(), q_bounds[1:].tolist()):
        rows = logical[start:end]
        m = rule_mask(rule, *geom, rows, logical)  # [rows, L], keys in physical order
        # keys past the end count as attended for "all" and as absent for "any"
        any_m = pad(m, (0, pad_n), value=False).view(len(rows), n_k, block_n).any(dim=2).any(dim=0)
        all_m = pad(m, (0, pad_n), value=True).view(len(rows), n_k, block_n).all(dim=2).all(dim=0)
        runs: list[tuple[int, int, int]] = []
        full_flags = all_m.tolist()
        for kt in torch.nonzero(any_m).flatten().tolist():
            full = int(full_flags[kt])
            if runs and runs[-1][1] == kt and runs[-1][2] == full:
                runs[-1] = (runs[-1][0], kt + 1, full)
            else:
                runs.append((kt, kt + 1, full))
        per_q_tile.append(runs)
    return per_q_tile


def tables_from_rules(rules, prefix: int, frames: int, height: int, width: int, seq_len: int,
                      block_m: int, block_n: int, device=None, segment_q_tiles: bool = True) -> KernelTables:
    """Exact KernelTables for head rules ([H, 16]; ROW_BASE is filled in here), identical rules
    sharing rows, q-tiles as `tables.q_tile_bounds`, masked_percent over the active heads. Cost
    grows with H x L^2 (evaluated on `device`): for tests and small sizes."""
    rows = [list(map(int, r)) for r in torch.as_tensor(rules).tolist()]
    if any(len(r) != RULE_INTS for r in rows):
        raise ValueError(f"each head rule needs {RULE_INTS} ints")
    geom = (prefix, frames, height, width)
    q_bounds = q_tile_bounds(prefix, frames * height * width, seq_len, block_m, segment_q_tiles)
    row_ptr = [0]
    runs: list[tuple[int, int, int]] = []
    bases: dict[tuple[int, ...], int] = {}
    counts: dict[tuple[int, ...], tuple[int, int]] = {}  # (visited, masked) tiles of each distinct rule
    head_rules = []
    visited = masked = 0
    for r in rows:
        key = tuple(r[:ROW_BASE] + r[ROW_BASE + 1:])
        if r[ORDER] != SKIP_HEAD and key not in bases:
            bases[key] = len(row_ptr) - 1
            first = len(runs)
            for tile_runs in _tile_runs(r, geom, seq_len, q_bounds, block_n, device or "cpu"):
                runs.extend(tile_runs)
                row_ptr.append(len(runs))
            counts[key] = (sum(b - a for a, b, _ in runs[first:]), sum(b - a for a, b, f in runs[first:] if not f))
        if r[ORDER] != SKIP_HEAD:
            visited, masked = visited + counts[key][0], masked + counts[key][1]
        r = list(r)
        r[ROW_BASE] = bases.get(key, 0)
        head_rules.append(r)
    cube_map = None
    if any(r[ORDER] == CUBE for r in rows):
        cube_map = cube_order_map(frames, height, width).to(device=device, dtype=torch.int32)
    tables = KernelTables(
        head_rules=torch.tensor(head_rules, dtype=torch.int32, device=device),
        row_ptr=torch.tensor(row_ptr, dtype=torch.int32, device=device),
        runs=torch.tensor(runs, dtype=torch.int32, device=device).reshape(-1, 3),
        prefix=prefix, frames=frames, height=height, width=width, seq_len=seq_len,
        block_m=block_m, block_n=block_n, cube_map=cube_map, segment_q_tiles=segment_q_tiles,
        masked_percent=round(100 * masked / visited) if visited else 0)
    tables.validate(check_contents=True)
    return tables
