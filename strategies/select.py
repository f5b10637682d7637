"""Selection under a global budget, from a table of measured errors and a cost table.

Per (bucket b, layer l, head h) the choice is ``argmin_c  cost[c] + lam * w[b] * err[b, l, h, c]``
(a Lagrangian relaxation of "least weighted error for this much time", or "least time for this
much error"); ``lam`` is found by bisection so the whole run meets the budget. ``w[b]`` is the
error weight of one forward in bucket ``b`` and ``n[b]`` the number of forwards in it.

Warm-up and dense layers are decided here too: leading buckets (and layers) whose weighted error
under the selection is more than ``outlier_ratio`` times the median of the others are made dense,
and ``lam`` is solved again with them fixed. The search ends with this function, so re-selecting
a stored table at the searched budget reproduces the search exactly; at a new budget, or with
another GPU's costs, it makes a new strategy in well under a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .patterns import Dense
from .strategy import Strategy

LAM_PRECISION = 1e-7  # in decades of lam: far finer than any change of choice


@dataclass(frozen=True)
class Selection:
    """Result of :func:`select`: choices [B, L, H] into the candidates, and what they predict."""

    choice: torch.Tensor
    lam: float
    warmup_buckets: int
    dense_layers: frozenset
    predicted_time: float   # attention time of the run, cost units
    dense_time: float       # the same run all dense
    predicted_error: float  # sum over the run of weighted relative errors

    @property
    def predicted_speedup(self) -> float:
        return self.dense_time / self.predicted_time if self.predicted_time > 0 else math.inf


def _dense_index(candidates) -> int:
    for i, p in enumerate(candidates):
        if isinstance(p, Dense):
            return i
    raise ValueError("the candidate set has no Dense() pattern; selection needs it as the fallback")


def select(candidates, errors: torch.Tensor, cost: torch.Tensor, step_weights: torch.Tensor,
           bucket_steps: torch.Tensor, dense_layer: float, *, target_speedup: float | None = None,
           error_budget: float | None = None, outlier_ratio: float = 3.0,
           max_warmup: float = 0.5) -> Selection:
    """Choose a candidate per (bucket, layer, head) under ONE budget: ``target_speedup`` (attention
    time vs all dense) or ``error_budget`` (sum of weighted relative errors over the run).

    ``errors`` [B, L, H, C] (NaN = not measured, never chosen), ``cost`` [C] per head per forward,
    ``step_weights`` [B] error weight of one forward, ``bucket_steps`` [B] forwards per bucket,
    ``dense_layer`` the time of one all-dense layer (the model's SDPA).
    """
    if (target_speedup is None) == (error_budget is None):
        raise ValueError("give exactly one budget: target_speedup or error_budget")
    if target_speedup is not None and not (target_speedup >= 1.0 and math.isfinite(target_speedup)):
        raise ValueError(f"target_speedup must be a finite number >= 1, got {target_speedup}")
    if error_budget is not None and not (error_budget >= 0 and math.isfinite(error_budget)):
        raise ValueError(f"error_budget must be a finite number >= 0, got {error_budget}")
    B, L, H, C = errors.shape
    if tuple(cost.shape) != (C,) or len(candidates) != C:
        raise ValueError(f"cost has shape {tuple(cost.shape)}, {len(candidates)} candidates, errors have {C}")
    if tuple(step_weights.shape) != (B,) or tuple(bucket_steps.shape) != (B,):
        raise ValueError(f"step_weights / bucket_steps must have shape ({B},)")
    dense_idx = _dense_index(candidates)

    err = errors.to(torch.float64).clone()
    cst = cost.to(torch.float64).clone()
    unusable = torch.isnan(err) | torch.isnan(cst).view(1, 1, 1, C)
    err[unusable] = math.inf
    err[..., dense_idx] = 0.0
    cst[torch.isnan(cst)] = 0.0
    n = bucket_steps.to(torch.float64)
    w = step_weights.to(torch.float64)
    w_fwd = torch.where(n > 0, w / n.clamp_min(1e-30), torch.zeros_like(w))
    dense_time = float(n.sum()) * L * float(dense_layer)

    forced = torch.zeros(B, L, dtype=torch.bool)
    # weighted error per forward, float32: one fused add + argmin per lam keeps a 1M-entry table fast
    weighted_err = torch.where(unusable, math.inf, w_fwd.view(B, 1, 1, 1) * err).float()
    cost_row = cst.float().view(1, 1, 1, C)

    # choices only change where lam = (cost gap) / (weighted-error gap): bracket log10(lam) by the
    # table's extremes, then bisect to LAM_PRECISION decades
    finite = weighted_err[torch.isfinite(weighted_err) & (weighted_err > 0)]
    gaps = cst.unique().diff()
    if finite.numel() and gaps.numel():
        lam_range = (math.log10(float(gaps.min()) / float(finite.max())) - 1.0,
                     math.log10(float(gaps.max()) / float(finite.min())) + 1.0)
    else:  # one cost or no error at all: every lam picks the same
        lam_range = (0.0, 1.0)
    steps = max(1, math.ceil(math.log2((lam_range[1] - lam_range[0]) / LAM_PRECISION)))

    def pick(lam: float) -> torch.Tensor:
        choice = torch.add(cost_row, weighted_err, alpha=lam).argmin(-1)
        if forced.any():
            choice[forced] = dense_idx
        return choice

    def time_of(choice: torch.Tensor) -> float:
        layer_t = torch.take(cst, choice).sum(-1)            # [B, L]
        # an all-dense layer runs the model's SDPA; otherwise one kernel launch runs the heads
        layer_t = torch.where((choice == dense_idx).all(-1), float(dense_layer), layer_t)
        return float((layer_t.sum(-1) * n).sum())

    def weighted_of(choice: torch.Tensor) -> torch.Tensor:
        """Weighted error of each (bucket, layer, head) over the run."""
        e = torch.gather(weighted_err, -1, choice.unsqueeze(-1)).squeeze(-1).double()
        return e * n.view(B, 1, 1)

    def evaluate(choice: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        weighted = weighted_of(choice)
        return time_of(choice), float(weighted.sum()), weighted

    def solve() -> tuple[float, torch.Tensor]:
        # time(lam) and error(lam) are monotone: bigger lam = more accurate, slower
        lo, hi = lam_range
        ok_hi = None
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            choice = pick(10.0 ** mid)
            if target_speedup is not None:
                good = time_of(choice) * target_speedup <= dense_time * (1 + 1e-12)
                lo, hi = (mid, hi) if good else (lo, mid)   # largest lam meeting the time
            else:
                good = float(weighted_of(choice).sum()) <= error_budget * (1 + 1e-12)
                lo, hi = (lo, mid) if good else (mid, hi)   # smallest lam meeting the error
            if good:
                ok_hi = mid
        lam_log = ok_hi if ok_hi is not None else (lo if target_speedup is not None else hi)
        lam = 10.0 ** lam_log
        return lam, pick(lam)

    def meets(choice: torch.Tensor) -> bool:
        return target_speedup is None or time_of(choice) * target_speedup <= dense_time * (1 + 1e-12)

    def try_force(rows, cols) -> bool:
        """Force (rows, cols) dense and re-solve; keep it only if the budget is still met."""
        nonlocal lam, choice
        before = forced.clone()
        forced[rows, cols] = True
        new_lam, new_choice = solve()
        if not meets(new_choice):
            forced.copy_(before)
            return False
        lam, choice = new_lam, new_choice
        return True

    lam, choice = solve()
    warm = 0
    while warm < min(int(math.floor(max_warmup * B)), B - 1):
        per_bucket = evaluate(choice)[2].sum((1, 2))
        if not float(per_bucket[warm]) > outlier_ratio * float(per_bucket[warm + 1:].median()):
            break
        if not try_force(warm, slice(None)):
            break
        warm += 1
    while warm < B - 1 and bool((choice[warm] == dense_idx).all()):  # already dense by choice
        warm += 1
    dense_layers = set()
    per_layer = evaluate(choice)[2][warm:].sum((0, 2))
    for l in per_layer.argsort(descending=True).tolist():
        others = torch.cat([per_layer[:l], per_layer[l + 1:]])
        if not (others.numel() and float(per_layer[l]) > outlier_ratio * float(others.median()) > 0):
            break
        if not try_force(slice(None), l):
            break
        dense_layers.add(l)
    # a layer whose heads are dense in every non-warm-up bucket is a dense layer too
    for l in range(L):
        if B > warm and bool((choice[warm:, l] == dense_idx).all()):
            dense_layers.add(l)
    t, e, _ = evaluate(choice)
    return Selection(choice=choice, lam=lam, warmup_buckets=warm, dense_layers=frozenset(dense_layers),
                     predicted_time=t, dense_time=dense_time, predicted_error=e)


def to_strategy(selection: Selection, candidates, sigma_edges, meta=None) -> Strategy:
    """The Strategy a selection stands for (warm-up as ``dense_above_sigma``)."""
    choice = selection.choice
    B, L, H = choice.shape
    patterns = tuple(tuple(tuple(candidates[int(c)] for c in choice[b, l]) for l in range(L)) for b in range(B))
    warm = selection.warmup_buckets
    return Strategy(layers=L, heads=H, sigma_edges=tuple(float(s) for s in sigma_edges), patterns=patterns,
                    dense_above_sigma=float(sigma_edges[warm]) if warm > 0 else None,
                    dense_layers=frozenset(selection.dense_layers), meta=dict(meta or {}))


def reselect(strategy: Strategy, *, target_speedup: float | None = None, error_budget: float | None = None,
             cost=None, dense_layer: float | None = None) -> Strategy:
    """A new Strategy from a loaded one's stored error table, for a new budget and/or another cost
    table (``cost``: tensor [C] per candidate, or a :class:`CostModel`). No search, < 1 s."""
    meta = dict(strategy.meta or {})
    record = meta.get("record")
    if record is None:
        raise ValueError("this strategy has no stored error table (it was not searched); re-selection needs one")
    settings = dict(meta.get("search") or {})
    cost_t = record.cost
    if cost is not None:
        if hasattr(cost, "costs"):
            dense_layer = cost.dense_layer() if dense_layer is None else dense_layer
            cost_t = cost.costs(record.candidates)
            meta["gpu"] = getattr(cost, "gpu", meta.get("gpu"))
        else:
            cost_t = torch.as_tensor(cost, dtype=torch.float64)
    if dense_layer is None:
        dense_layer = record.dense_layer
    sel = select(record.candidates, record.errors, cost_t, record.step_weights, record.bucket_steps,
                 dense_layer, target_speedup=target_speedup, error_budget=error_budget,
                 outlier_ratio=float(settings.get("outlier_ratio", 3.0)),
                 max_warmup=float(settings.get("max_warmup", 0.5)))
    from .file import SearchRecord

    meta["record"] = SearchRecord(record.candidates, record.errors, torch.as_tensor(cost_t, dtype=torch.float32),
                                  record.step_weights, record.bucket_steps, float(dense_layer))
    settings.update(target_speedup=target_speedup, error_budget=error_budget, lam=sel.lam,
                    dense_layer=float(dense_layer), predicted_speedup=sel.predicted_speedup,
                    predicted_error=sel.predicted_error)
    meta["search"] = settings
    return to_strategy(sel, record.candidates, strategy.sigma_edges, meta)
