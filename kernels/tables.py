"""KernelTables: the block tables a layer's plan hands to the attention kernels (DESIGN.md 4)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .rule import CUBE, ORDER, ROW_BASE, RULE_INTS, SKIP_HEAD, SPACE_MAJOR, cube_order_map


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=64)
def q_tile_bounds(prefix: int, grid_tokens: int, seq_len: int, block_m: int, segment_aligned: bool = True) -> np.ndarray:
    """Physical row where each q-tile starts, then seq_len (int64 [q-tiles + 1], read-only).

    Tiles hold block_m rows; segment-aligned tiles restart at the grid's first row and at the row
    after it, so no q-tile mixes non-grid rows (text, which attend every key) with grid rows: such a
    tile would mask nearly every k-tile it visits. Without alignment tiles start at multiples of
    block_m (the tiling FlexAttention's block masks need)."""
    cuts = (prefix, prefix + grid_tokens) if segment_aligned else (0, 0)
    starts = [np.arange(a, b, block_m) for a, b in zip((0,) + cuts, cuts + (seq_len,))]
    bounds = np.append(np.concatenate(starts), seq_len).astype(np.int64)
    bounds.flags.writeable = False  # cached: shared by every caller
    return bounds


@dataclass
class KernelTables:
    """One layer's head rules and range-encoded k-tile runs per (head, q-tile).

    Head h's q-tile t (`q_tile_bounds`: up to BLOCK_M positions in the head's physical order; with
    `segment_q_tiles` the tiles restart where the grid starts and ends) visits the runs
    `runs[row_ptr[base + t] : row_ptr[base + t + 1]]` with `base = head_rules[h, ROW_BASE]`; each run
    is (k_tile_start, k_tile_end_exclusive, full_flag) over BLOCK_N-wide k-tiles. A full tile has
    every (q, k) pair attended, so no mask is computed there. `cube_map` (int32 [F*H*W], from
    `rule.cube_order_map`) maps cube-order physical grid positions to logical grid indices; it is
    required when a head has ORDER 2 (cube order) and ignored otherwise.
    """

    head_rules: torch.Tensor
    row_ptr: torch.Tensor
    runs: torch.Tensor
    prefix: int
    frames: int
    height: int
    width: int
    seq_len: int
    block_m: int
    block_n: int
    cube_map: torch.Tensor | None = None
    density_bucket: int = 0  # autotune key only: round(-log2(visited-tile density)), 0 (dense) to 4
    segment_q_tiles: bool = True
    masked_percent: int = 0  # kernel choice only: visited tiles that are partial (masked), in percent

    @property
    def heads(self) -> int:
        return int(self.head_rules.shape[0])

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def grid_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def suffix(self) -> int:
        return self.seq_len - self.prefix - self.grid_tokens

    @property
    def q_bounds(self) -> np.ndarray:
        """Each q-tile's first physical row, then seq_len (`q_tile_bounds`)."""
        return q_tile_bounds(self.prefix, self.grid_tokens, self.seq_len, self.block_m, self.segment_q_tiles)

    @property
    def num_q_tiles(self) -> int:
        return len(self.q_bounds) - 1

    @property
    def num_k_tiles(self) -> int:
        return _cdiv(self.seq_len, self.block_n)

    @property
    def device(self) -> torch.device:
        return self.head_rules.device

    def uses_cube_order(self) -> bool:
        """Whether some head runs in cube order (ORDER 2) and so needs `cube_map`."""
        return self._head_info()[1]

    def launch_heads(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(active heads int32, skip heads int64, permuted heads int64, each head's slot among them
        int32 [H] (-1 for the others), the permuted heads' orders int32) on the tables' device, from
        one cached host read. Permuted heads (space-major or cube order) get K/V copies in their own
        physical order."""
        (active, skip), _, permuted = self._head_info()
        return (active, skip) + permuted

    def _head_info(self):
        """((active, skip), any cube-order head, (permuted heads, slots, orders)), computed once per
        head_rules tensor (one host sync) and cached on that tensor, so tables rebuilt around the
        same head_rules reuse it."""
        rules = self.head_rules
        try:
            version = rules._version
        except RuntimeError:  # an inference tensor (made under torch.inference_mode) has no version
            version = None
        cached = getattr(rules, "_sparse_vdit_head_split", None)
        if cached is None or cached[0] != version:
            order = rules[:, ORDER].cpu()
            ids = torch.arange(self.heads)
            active = ids[order != SKIP_HEAD].to(device=self.device, dtype=torch.int32)
            skip = ids[order == SKIP_HEAD].to(device=self.device, dtype=torch.int64)
            moved = (order == SPACE_MAJOR) | (order == CUBE)
            slot = torch.where(moved, torch.cumsum(moved, 0) - 1, -1)
            permuted = (ids[moved].to(self.device), slot.to(device=self.device, dtype=torch.int32),
                        order[moved].to(device=self.device, dtype=torch.int32))
            cached = (version, ((active, skip), bool((order == CUBE).any()), permuted))
            rules._sparse_vdit_head_split = cached
        return cached[1]

    def to(self, device) -> "KernelTables":
        """Copy of these tables with every tensor on `device`."""
        return KernelTables(self.head_rules.to(device), self.row_ptr.to(device), self.runs.to(device),
                            self.prefix, self.frames, self.height, self.width, self.seq_len,
                            self.block_m, self.block_n,
                            None if self.cube_map is None else self.cube_map.to(device), self.density_bucket,
                            self.segment_q_tiles, self.masked_percent)

    def validate(self, check_contents: bool = False) -> None:
        """Raise ValueError on bad shapes, dtypes, devices or geometry.

        With check_contents=True also check (on the CPU, a device sync) that every active head's
        row pointers and runs are in range and well ordered.
        """
        for name in ("head_rules", "row_ptr", "runs"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"KernelTables.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.int32:
                raise ValueError(f"KernelTables.{name} must be int32, got {t.dtype}")
            if t.device != self.head_rules.device:
                raise ValueError(f"KernelTables.{name} is on {t.device}, head_rules on {self.head_rules.device}")
        if self.head_rules.dim() != 2 or self.head_rules.shape[1] != RULE_INTS or self.head_rules.shape[0] == 0:
            raise ValueError(f"head_rules must be [H>0, {RULE_INTS}], got {tuple(self.head_rules.shape)}")
        if self.row_ptr.dim() != 1 or self.row_ptr.numel() == 0:
            raise ValueError(f"row_ptr must be 1-D and non-empty, got {tuple(self.row_ptr.shape)}")
        if self.runs.dim() != 2 or self.runs.shape[1] != 3:
            raise ValueError(f"runs must be [R, 3], got {tuple(self.runs.shape)}")
        if self.cube_map is not None:
            c = self.cube_map
            if not isinstance(c, torch.Tensor) or c.dtype != torch.int32 or c.device != self.head_rules.device:
                raise ValueError("KernelTables.cube_map must be an int32 tensor on the head_rules' device")
        for name in ("prefix", "frames", "height", "width", "seq_len", "block_m", "block_n"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"KernelTables.{name} must be an int, got {getattr(self, name)!r}")
        if self.prefix < 0 or min(self.frames, self.height, self.width) <= 0:
            raise ValueError(f"bad geometry prefix={self.prefix} frames={self.frames} "
                             f"height={self.height} width={self.width}")
        if self.suffix < 0:
            raise ValueError(f"seq_len {self.seq_len} < prefix {self.prefix} + grid {self.grid_tokens}")
        if self.cube_map is not None and tuple(self.cube_map.shape) != (self.grid_tokens,):
            raise ValueError(f"cube_map must have shape ({self.grid_tokens},), got {tuple(self.cube_map.shape)}")
        if not isinstance(self.masked_percent, int) or not 0 <= self.masked_percent <= 100:
            raise ValueError(f"KernelTables.masked_percent must be an int in [0, 100], got {self.masked_percent!r}")
        if not isinstance(self.segment_q_tiles, bool):
            raise ValueError(f"KernelTables.segment_q_tiles must be a bool, got {self.segment_q_tiles!r}")
        for name in ("block_m", "block_n"):
            b = getattr(self, name)
            if b < 16 or b & (b - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {b}")
        if check_contents:
            self._check_contents()

    def _check_contents(self) -> None:
        rules = self.head_rules.cpu()
        row_ptr = self.row_ptr.cpu().to(torch.int64)
        runs = self.runs.cpu()
        nq, nk = self.num_q_tiles, self.num_k_tiles
        if row_ptr.numel() > 1 and bool((row_ptr[1:] < row_ptr[:-1]).any()):
            raise ValueError("row_ptr must be non-decreasing")
        if int(row_ptr.min()) < 0 or int(row_ptr.max()) > runs.shape[0]:
            raise ValueError(f"row_ptr values must lie in [0, {runs.shape[0]}]")
        if runs.numel():
            start, end, full = runs[:, 0], runs[:, 1], runs[:, 2]
            if bool((start < 0).any() or (end > nk).any() or (start >= end).any()):
                raise ValueError(f"runs must satisfy 0 <= k_tile_start < k_tile_end <= {nk}")
            if bool(((full != 0) & (full != 1)).any()):
                raise ValueError("runs full_flag must be 0 or 1")
        for h, r in enumerate(rules.tolist()):
            if r[ORDER] == SKIP_HEAD:
                continue
            if r[ORDER] not in (0, 1, CUBE):
                raise ValueError(f"head {h}: ORDER must be -1, 0, 1 or 2, got {r[ORDER]}")
            if r[ORDER] == CUBE and (self.cube_map is None or not torch.equal(
                    self.cube_map.cpu().long(), cube_order_map(self.frames, self.height, self.width))):
                raise ValueError(f"head {h} runs in cube order: cube_map must be rule.cube_order_map "
                                 "of the tables' geometry")
            if r[ROW_BASE] < 0 or r[ROW_BASE] + nq >= row_ptr.numel():
                raise ValueError(f"head {h}: ROW_BASE {r[ROW_BASE]} + {nq} q-tiles exceeds row_ptr "
                                 f"of length {row_ptr.numel()}")
