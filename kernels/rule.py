"""The 16-int head rule: the exact token-level definition every kernel path must match.

A head's rule is one int32 row (see docs/DESIGN.md section 3). `rule_mask` evaluates it in pure
torch and is THE definition: the Triton kernel and the torch reference both reproduce it.
Indices below are logical token positions `[prefix | grid frame-major | suffix]`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

# Column indices of a rule row.
ORDER = 0
ROW_BASE = 1
DIAG = 2
MD_S = 3
MD_T = 4
WIN_F = 5
WIN_Y = 6
WIN_X = 7
STRIPE_FIRST = 8
N_COLS = 9
COLS = 10
RULE_INTS = 16
MAX_COLS = 3

# Values of rule[ORDER].
SKIP_HEAD = -1
FRAME_MAJOR = 0
SPACE_MAJOR = 1
CUBE = 2

# Cube order: each frame is cut into cubes of CUBE_EDGE x CUBE_EDGE tokens (ragged at the bottom and
# right edges), cubes enumerated (frame, cube row, cube column), tokens inside a cube row-major.
CUBE_EDGE = 8


def make_rule(order: int = 0, diag: int = -1, md=None, win=None, stripe: int = 0, cols=()) -> list[int]:
    """A 16-int rule row with every component off except those given: md = (spatial radius,
    frame radius), win = (frame, row, column radii), cols = [(start, end), ...] grid ranges."""
    r = [0] * RULE_INTS
    r[ORDER], r[DIAG], r[MD_S], r[MD_T], r[WIN_F], r[WIN_Y], r[WIN_X] = order, diag, -1, -1, -1, -1, -1
    if md is not None:
        r[MD_S], r[MD_T] = md
    if win is not None:
        r[WIN_F], r[WIN_Y], r[WIN_X] = win
    if len(cols) > MAX_COLS:
        raise ValueError(f"at most {MAX_COLS} column ranges, got {len(cols)}")
    r[STRIPE_FIRST], r[N_COLS] = stripe, len(cols)
    for i, (a, b) in enumerate(cols):
        r[COLS + 2 * i], r[COLS + 2 * i + 1] = a, b
    return r


def _as_rule_rows(rules) -> tuple[torch.Tensor, bool]:
    """Return rules as an int64 [H, 16] CPU-or-device tensor and whether the input was one row."""
    t = torch.as_tensor(rules)
    single = t.dim() == 1
    if single:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[1] != RULE_INTS:
        raise ValueError(f"a head rule has {RULE_INTS} ints; got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"head rules must be integers, got {t.dtype}")
    return t.to(torch.int64), single


def _check_geometry(prefix: int, frames: int, height: int, width: int) -> None:
    if prefix < 0 or frames <= 0 or height <= 0 or width <= 0:
        raise ValueError(
            f"bad geometry: prefix={prefix} frames={frames} height={height} width={width} "
            "(frames/height/width must be > 0, prefix >= 0)"
        )


def rule_mask(rules, prefix: int, frames: int, height: int, width: int,
              q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
    """Exact attention mask of one rule row ([16] -> [Q, K]) or of rows ([H, 16] -> [H, Q, K]).

    q_idx / k_idx are 1-D logical token indices. Non-grid query rows attend every key, non-grid
    keys are attended by every query, a query attends itself, otherwise the OR of the enabled
    components decides. A skip head (ORDER -1) attends nothing (all False).
    """
    _check_geometry(prefix, frames, height, width)
    rows, single = _as_rule_rows(rules)
    q_idx = torch.as_tensor(q_idx).to(torch.int64).reshape(-1)
    k_idx = torch.as_tensor(k_idx).to(torch.int64).reshape(-1)
    device = q_idx.device
    k_idx = k_idx.to(device)
    P = height * width
    N = frames * P

    gq = (q_idx - prefix)[:, None]  # [Q, 1]
    gk = (k_idx - prefix)[None, :]  # [1, K]
    q_grid = (gq >= 0) & (gq < N)
    k_grid = (gk >= 0) & (gk < N)
    fq, sq = torch.div(gq, P, rounding_mode="floor"), torch.remainder(gq, P)
    fk, sk = torch.div(gk, P, rounding_mode="floor"), torch.remainder(gk, P)
    yq, xq = torch.div(sq, width, rounding_mode="floor"), torch.remainder(sq, width)
    yk, xk = torch.div(sk, width, rounding_mode="floor"), torch.remainder(sk, width)
    always = (~q_grid) | (~k_grid) | (q_idx[:, None] == k_idx[None, :])

    masks = []
    for r in rows.tolist():
        if r[ORDER] == SKIP_HEAD:
            masks.append(torch.zeros(always.shape, dtype=torch.bool, device=device))
            continue
        m = always.clone()
        if r[DIAG] >= 0:
            m |= (gq - gk).abs() <= r[DIAG]
        if r[MD_S] >= 0:
            m |= ((sq - sk).abs() <= r[MD_S]) & ((fq - fk).abs() <= r[MD_T])
        if r[WIN_F] >= 0:
            m |= (((fq - fk).abs() <= r[WIN_F]) & ((yq - yk).abs() <= r[WIN_Y])
                  & ((xq - xk).abs() <= r[WIN_X]))
        if r[STRIPE_FIRST] > 0:
            m |= gk < r[STRIPE_FIRST]
        for c in range(min(max(r[N_COLS], 0), MAX_COLS)):
            start, end = r[COLS + 2 * c], r[COLS + 2 * c + 1]
            m |= (gk >= start) & (gk < end)
        masks.append(m)
    out = torch.stack(masks)
    return out[0] if single else out


@functools.lru_cache(maxsize=64)
def _cube_map_numpy(frames: int, height: int, width: int) -> np.ndarray:
    g = np.arange(frames * height * width, dtype=np.int64)
    f, y, x = g // (height * width), g // width % height, g % width
    cy, cx, e = y // CUBE_EDGE, x // CUBE_EDGE, CUBE_EDGE
    cube_h = np.minimum(e, height - cy * e)  # rows of this token's cube
    cube_w = np.minimum(e, width - cx * e)   # columns of this token's cube
    p = f * height * width + cy * e * width + cx * e * cube_h + (y - cy * e) * cube_w + (x - cx * e)
    out = np.empty_like(g)
    out[p] = g
    out.flags.writeable = False
    return out


def cube_order_map(frames: int, height: int, width: int) -> torch.Tensor:
    """int64 [F*H*W]: grid index in logical (frame-major) order of each physical grid position of
    the cube order (ORDER 2). Frames stay contiguous: position p lies in frame p // (H*W)."""
    _check_geometry(0, frames, height, width)
    return torch.from_numpy(_cube_map_numpy(frames, height, width).copy())


def _grid_part(idx, prefix: int, frames: int, height: int, width: int):
    """(int64 indices, their grid offsets (0 off the grid), on-grid mask, tokens per frame)."""
    _check_geometry(prefix, frames, height, width)
    idx = torch.as_tensor(idx).to(torch.int64)
    P = height * width
    g = idx - prefix
    on_grid = (g >= 0) & (g < frames * P)
    return idx, torch.where(on_grid, g, 0), on_grid, P


def physical_to_logical(p_idx: torch.Tensor, order: int, prefix: int, frames: int,
                        height: int, width: int) -> torch.Tensor:
    """Map a head's physical positions to logical token indices (identity off the grid)."""
    p_idx, g, on_grid, P = _grid_part(p_idx, prefix, frames, height, width)
    if order not in (SPACE_MAJOR, CUBE):
        return p_idx.clone()
    if order == CUBE:
        return torch.where(on_grid, prefix + cube_order_map(frames, height, width).to(g.device)[g], p_idx)
    s, f = torch.div(g, frames, rounding_mode="floor"), torch.remainder(g, frames)
    return torch.where(on_grid, prefix + f * P + s, p_idx)


def logical_to_physical(idx: torch.Tensor, order: int, prefix: int, frames: int,
                        height: int, width: int) -> torch.Tensor:
    """Inverse of `physical_to_logical`: logical token indices to a head's physical positions."""
    idx, g, on_grid, P = _grid_part(idx, prefix, frames, height, width)
    if order not in (SPACE_MAJOR, CUBE):
        return idx.clone()
    if order == CUBE:
        inverse = torch.argsort(cube_order_map(frames, height, width)).to(g.device)
        return torch.where(on_grid, prefix + inverse[g], idx)
    f, s = torch.div(g, P, rounding_mode="floor"), torch.remainder(g, P)
    return torch.where(on_grid, prefix + s * frames + f, idx)
