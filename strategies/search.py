"""The closed-loop strategy search.

A deciding controller (:class:`SearchController`, same ``attention`` method as the engine) sits at
the model's real call sites during a real sampling run. At each (step, layer) it estimates, on a
fixed sample of query rows, every candidate's output and the dense output, and records per head
the relative error ``|O_c,h - O_dense,h|^2 / |O_dense|^2`` (head error over the WHOLE layer's
output energy, so head errors of one layer add up; summed over the batch, so cond and uncond share
one decision). No attention map is built: scores are ``[B, H, rows, L]``.

The search is two passes of the caller's sampling loop:

1. dense pass: every call runs dense (the dense trajectory: the reference sample for free) and
   is measured; :func:`~.select.select` on this table decides warm-up, dense layers and ``lam``.
2. closed pass: the same run again; warm-up steps and dense layers run dense, every other step is
   measured on its actual (already sparse) inputs, each head takes
   ``argmin cost + lam * w * err`` and the chosen output is fed forward. ``lam`` is re-solved
   after every step so the run keeps to the budget.

The result is ``select`` on the final table (closed-pass rows where measured), so
``select.reselect`` at the searched budget reproduces it exactly. Error weights per step are
``w_i = dt_i / max(1 - sigma_i, dt_i)`` (``dt_i = sigma_i - sigma_{i+1}``): the step's change of
the latent relative to the signal still present, so early errors (which decide the video) weigh
more. A search can be cancelled (``cancel``: callable or Event) and resumed from ``state_path``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..kernels.rule import rule_mask
from .cost import CostModel
from .file import SearchRecord
from .geometry import VideoGeometry
from .patterns import FAMILIES, Dense, Skip, pattern_for_density
from .select import Selection, select, to_strategy

PHASES = ("dense", "closed")
GROUP_BYTES = 128 << 20  # bytes of one weight block [B*H, candidates, rows, keys] built at once


class SearchCancelled(Exception):
    """Raised out of :func:`search` when ``cancel`` fired; the partial state is in ``state``
    (and in ``state_path`` when one was given), and ``search(..., state_path=...)`` resumes."""

    def __init__(self, state: "SearchState"):
        super().__init__("search cancelled; partial results kept" + (" (resumable)" if state else ""))
        self.state = state


@dataclass(frozen=True)
class SearchSettings:
    """Knobs of a search. Exactly one of ``target_speedup`` / ``error_budget``."""

    target_speedup: float | None = 2.0
    error_budget: float | None = None
    densities: tuple = (0.05, 0.1, 0.2, 0.35)
    families: tuple = FAMILIES
    rows: int = 64              # sampled query rows per call
    buckets: int | None = None  # sigma buckets; None = one per step
    outlier_ratio: float = 3.0
    max_warmup: float = 0.5
    closed_loop: bool = True
    seed: int = 0

    def __post_init__(self):
        if (self.target_speedup is None) == (self.error_budget is None):
            raise ValueError("give exactly one budget: target_speedup or error_budget")
        if self.rows < 1:
            raise ValueError(f"rows must be >= 1, got {self.rows}")
        if not self.densities or any(not 0 < d < 1 for d in self.densities):
            raise ValueError(f"densities must be in (0, 1), got {self.densities}")
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown pattern families {sorted(unknown)}; known: {FAMILIES}")


def candidate_set(geom: VideoGeometry, densities: Sequence[float], families: Sequence[str] = FAMILIES) -> tuple:
    """The stated candidate set: Dense, Skip, then each family at the widths closest to each target
    density at ``geom`` (duplicates dropped, order kept)."""
    out = [Dense(), Skip()]
    for fam in families:
        for d in densities:
            p = pattern_for_density(fam, d, geom)
            if p not in out:
                out.append(p)
    return tuple(out)


def step_weights(sigmas: Sequence[float]) -> list[float]:
    """Error weight of each step: ``dt / max(1 - sigma, dt)`` with ``dt`` to the next sigma (0 after
    the last)."""
    out = []
    for i, s in enumerate(sigmas):
        nxt = sigmas[i + 1] if i + 1 < len(sigmas) else 0.0
        dt = max(float(s) - float(nxt), 1e-6)
        out.append(dt / max(1.0 - float(s), dt))
    return out


def bucket_plan(sigmas: Sequence[float], buckets: int | None) -> tuple[list[int], list[float]]:
    """Bucket of each step (consecutive steps grouped evenly) and the descending sigma edges."""
    T = len(sigmas)
    if T < 1:
        raise ValueError("a search needs at least one step")
    if any(float(a) <= float(b) for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError("sigmas must be strictly descending")
    B = T if buckets is None else max(1, min(int(buckets), T))
    of_step = [min(B - 1, i * B // T) for i in range(T)]
    edges = [max(float(sigmas[0]), 1.0) + 1.0]
    for b in range(1, B):
        first = of_step.index(b)
        edges.append(0.5 * (float(sigmas[first - 1]) + float(sigmas[first])))
    edges.append(0.0)
    return of_step, edges


@dataclass
class SearchState:
    """Everything measured so far (plain tensors + JSON, saved without pickle)."""

    settings: dict
    sigmas: list
    layers: int
    heads: int = 0
    candidates: list = field(default_factory=list)   # pattern dicts
    cost: list = field(default_factory=list)
    dense_layer: float = 0.0
    geometry: dict | None = None
    phase: str = "dense"
    done_steps: int = 0                                # steps finished in the current phase
    lam: float = 0.0
    warmup_buckets: int = 0
    dense_layers: list = field(default_factory=list)
    num: torch.Tensor | None = None   # [2 phases, T, layers, H, C] summed squared error
    den: torch.Tensor | None = None   # [2 phases, T, layers] summed squared dense output
    decision: torch.Tensor | None = None  # [T, layers, H] candidate index of the closed pass, -1 none

    def allocate(self, heads: int, n_candidates: int) -> None:
        T, L = len(self.sigmas), self.layers
        self.heads = heads
        self.num = torch.zeros(2, T, L, heads, n_candidates, dtype=torch.float64)
        self.den = torch.zeros(2, T, L, dtype=torch.float64)
        self.decision = torch.full((T, L, heads), -1, dtype=torch.int16)

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        doc = {k: v for k, v in asdict(self).items() if k not in ("num", "den", "decision")}
        tensors = {} if self.num is None else {"num": self.num, "den": self.den, "decision": self.decision}
        tmp = f"{path}.{os.getpid()}.tmp"
        save_file(tensors, tmp, metadata={"sparse_vdit_search_state": json.dumps(doc)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "SearchState":
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            raw = (f.metadata() or {}).get("sparse_vdit_search_state")
            if raw is None:
                raise ValueError(f"{path} is not a search state file")
            doc = json.loads(raw)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(**doc, **tensors)

    def table(self) -> torch.Tensor:
        """Relative errors per step [T, layers, H, C]: closed-pass rows where measured, else dense."""
        rel = self.num / self.den.clamp_min(1e-30)[..., None, None]
        closed = self.den[1] > 0
        return torch.where(closed[..., None, None], rel[1], rel[0])


class SearchController:
    """The deciding controller: measures candidates at the call sites and feeds the choice forward.

    Same ``attention`` contract as ``SparseEngine``; the sampling loop calls ``begin_step``.
    """

    def __init__(self, state: SearchState, settings: SearchSettings, *, cost_model_factory=None,
                 on_step: Callable[[int], None] | None = None, decide: bool = True):
        self.decide = decide  # False: follow state.decision as given (measuring a fixed strategy)
        self.state = state
        self.settings = settings
        self.of_step, self.edges = bucket_plan(state.sigmas, settings.buckets)
        self.weights = step_weights(state.sigmas)
        self._cost_model_factory = cost_model_factory or (
            lambda geom, heads, head_dim, dtype, device: CostModel(geom, heads, head_dim, dtype, device))
        self._on_step = on_step
        self._candidates = None
        self._cost = None
        self._masks: dict = {}
        self._step = None
        self._told = False  # whether the loop calls begin_step; else steps follow the sigma of calls
        self._seen: set = set()
        self.cost_model = None
        self._timings: dict = {}  # (phase, kind) -> [seconds, calls, pending CUDA event pairs]

    # ---------------------------------------------------------------------------- set-up
    def begin_step(self, sigma: float, step: int) -> None:
        """Called by the sampling loop before each step."""
        self._told = True
        self._enter(int(step))

    def _enter(self, step: int) -> None:
        if not 0 <= step < len(self.state.sigmas):
            raise ValueError(f"step {step} outside the searched schedule of {len(self.state.sigmas)} steps")
        if self._on_step is not None:
            self._on_step(step)
        self._step = step

    def _step_of(self, sigma: float) -> int:
        """The step of a call: as told by begin_step, else the schedule step nearest ``sigma``."""
        if not self._told:
            sigmas = self.state.sigmas
            step = min(range(len(sigmas)), key=lambda i: abs(sigmas[i] - float(sigma)))
            if step != self._step:
                self._enter(step)
        return self._step

    def _setup(self, geometry: VideoGeometry, heads: int, head_dim: int, dtype, device) -> None:
        from .patterns import pattern_from_dict

        st = self.state
        if st.geometry is not None and st.geometry != _geom_dict(geometry):
            raise ValueError(f"search geometry changed mid-run: {st.geometry} vs {_geom_dict(geometry)}")
        # all or nothing: a call that raises here (the call site then runs dense) leaves no
        # half-made state behind, so the next call sets up again
        cost_model = self._cost_model_factory(geometry, heads, head_dim, dtype, device)
        if st.candidates:
            candidates = tuple(pattern_from_dict(d) for d in st.candidates)
        else:
            candidates = candidate_set(geometry, self.settings.densities, self.settings.families)
            cost = [float(c) for c in cost_model.costs(candidates)]
            dense_layer = float(cost_model.dense_layer())
            st.candidates, st.cost, st.dense_layer = [p.to_dict() for p in candidates], cost, dense_layer
            st.geometry = _geom_dict(geometry)
            st.allocate(heads, len(candidates))
        if st.heads != heads:
            raise ValueError(f"search state has {st.heads} heads, the model {heads}")
        self.cost_model, self._candidates = cost_model, candidates
        self._cost = torch.tensor(st.cost, dtype=torch.float64)
        self._dense_idx = next(i for i, p in enumerate(self._candidates) if isinstance(p, Dense))

    def _probe(self, geometry: VideoGeometry, device) -> "CandidateMasks":
        """The sampled rows and every candidate's masks at them, built once per (geometry, device)."""
        key = (geometry, str(device))
        if key not in self._masks:
            self._masks[key] = CandidateMasks(*sample_masks(self._candidates, geometry, self.settings.rows,
                                                            self.settings.seed, device),
                                              skip=[isinstance(p, Skip) for p in self._candidates])
        return self._masks[key]

    # ---------------------------------------------------------------------------- the call site
    def attention(self, q, k, v, *, layer: int, sigma: float, geometry: VideoGeometry, layout: str,
                  dense: Callable, kv_len=None):
        st = self.state
        if layout not in ("bhld", "blhd"):
            raise ValueError(f"layout must be 'bhld' or 'blhd', got {layout!r}")
        if not 0 <= layer < st.layers:
            raise ValueError(f"layer {layer} out of range 0..{st.layers - 1}")
        heads = q.shape[1] if layout == "bhld" else q.shape[2]
        if self._candidates is None:
            self._setup(geometry, heads, q.shape[-1], q.dtype, q.device)
        step = self._step_of(sigma)
        phase = 0 if st.phase == "dense" else 1
        replay = step < st.done_steps
        key = (st.phase, step, layer)
        first_call = key not in self._seen
        self._seen.add(key)
        bucket = self.of_step[step]
        if phase == 0:
            if not replay:
                self._timed("measure", q, self._measure, q, k, v, layout, geometry, kv_len, phase, step, layer)
            return dense(q, k, v)
        forced = bucket < st.warmup_buckets or layer in st.dense_layers
        if forced:
            return dense(q, k, v)
        if not self.decide and bool((st.decision[step, layer] == self._dense_idx).all()):
            return dense(q, k, v)
        if not replay:
            errs = self._timed("measure", q, self._measure, q, k, v, layout, geometry, kv_len, phase, step, layer)
            if first_call and self.decide:
                w = self.weights[step]
                score = self._cost.view(1, -1) + st.lam * w * errs
                st.decision[step, layer] = score.argmin(-1).to(torch.int16)
        chosen = tuple(self._candidates[int(c)] for c in st.decision[step, layer])
        return self._timed("sparse", q, run_patterns, chosen, q, k, v, geometry=geometry, layout=layout, dense=dense,
                           kv_len=kv_len)

    def _timed(self, kind: str, like: torch.Tensor, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, its time added to ``call_seconds()`` under (phase, kind): CUDA
        events on a GPU (read at the end of the pass, no extra sync), wall time elsewhere."""
        entry = self._timings.setdefault((self.state.phase, kind), [0.0, 0, []])
        entry[1] += 1
        if like.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            entry[2].append((start, end))
            return out
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        entry[0] += time.perf_counter() - started
        return out

    def call_seconds(self) -> dict:
        """``{"<phase> <kind>": (seconds, calls)}`` so far: "measure" is the candidates' error
        estimate of a call, "sparse" the chosen patterns' layer (closed pass)."""
        out = {}
        for (phase, kind), entry in self._timings.items():
            if entry[2]:
                entry[2][-1][1].synchronize()
                entry[0] += sum(a.elapsed_time(b) for a, b in entry[2]) / 1000.0
                entry[2].clear()
            out[f"{phase} {kind}"] = (entry[0], entry[1])
        return out

    def _measure(self, q, k, v, layout, geometry, kv_len, phase, step, layer) -> torch.Tensor:
        """Add this call's squared errors to the table; return the relative errors [H, C] so far."""
        probe = self._probe(geometry, q.device)
        num, den = candidate_errors(q, k, v, probe.rows, probe, layout=layout, kv_len=kv_len)
        both = torch.cat([num.flatten(), den.view(1)]).cpu()  # one transfer
        st = self.state
        st.num[phase, step, layer] += both[:-1].view_as(num)
        st.den[phase, step, layer] += both[-1]
        return st.num[phase, step, layer] / max(float(st.den[phase, step, layer]), 1e-30)


def sample_masks(candidates, geometry: VideoGeometry, rows: int, seed: int, device) -> tuple:
    """(rows [R], masks bool [C, R, L]) on ``device``: a fixed stratified sample of query rows (one
    per equal slice of the sequence, at a seeded random offset in it) and each candidate's exact
    mask at them, from the kernels' own rule (the function every backend computes)."""
    L = geometry.seq_len
    R = min(rows, L)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.arange(R, dtype=torch.float64) * L / R
    offs = torch.rand(R, generator=gen, dtype=torch.float64) * (L / R)
    picked = torch.unique((starts + offs).floor().long().clamp(0, L - 1)).to(device)
    rules = torch.tensor([p.head_rule(geometry) for p in candidates], device=device)
    masks = rule_mask(rules, geometry.prefix, geometry.frames, geometry.height, geometry.width,
                      picked, torch.arange(L, device=device))
    return picked, masks


def _geom_dict(g: VideoGeometry) -> dict:
    return {k: int(getattr(g, k)) for k in ("frames", "height", "width", "prefix", "suffix")}


class CandidateMasks:
    """The sampled rows' masks of every candidate at one geometry on one device, in the forms
    :func:`candidate_errors` uses; the search builds it once per (geometry, device).

    ``masks`` bool [C, R, L]. Candidates flagged ``skip`` attend nothing (their error is the head's
    output energy); candidates whose mask is all True at these rows (Dense, or a pattern that
    covers every key of the sampled rows) have error 0 exactly; the others are ``measured``.
    """

    def __init__(self, rows: torch.Tensor, masks: torch.Tensor, skip=None):
        C = masks.shape[0]
        self.rows = rows
        self.masks = masks
        self.skip = [bool(x) for x in (skip if skip is not None else [False] * C)]
        full = masks.flatten(1).all(1).tolist()
        self.measured = [c for c in range(C) if not self.skip[c] and not full[c]]
        index = torch.tensor(self.measured, dtype=torch.long, device=masks.device)
        self.inner = masks.index_select(0, index)                       # bool [C', R, L]
        self.by_row = self.inner.permute(1, 2, 0).to(torch.float32).contiguous()  # [R, L, C']: denominators

    @property
    def candidates(self) -> int:
        return len(self.skip)


def _weights_dtype(q: torch.Tensor) -> torch.dtype:
    """Dtype of the candidates' weight blocks and their product with V: the model's half type on a
    GPU (tensor cores; V is exact in it), float32 elsewhere."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return torch.bfloat16
    return torch.float32


def candidate_errors(q, k, v, rows, masks, *, layout: str, kv_len=None, skip=None, weights_dtype=None):
    """Squared error of each candidate vs dense on the sampled query ``rows``.

    masks: bool [C, R, L] (row r of candidate c), or a :class:`CandidateMasks` built from them
    (what the search passes: built once per geometry). Returns (num [H, C], den scalar), float64
    on q's device: num sums ``|O_c - O_dense|^2`` over batch, rows and channels per head; den sums
    ``|O_dense|^2`` over batch, rows, heads and channels. Memory: [B, H, R, L] scores and weight
    blocks of at most ``GROUP_BYTES``; never an L x L map.

    With ``p = exp(s - rowmax)``, ``T = sum p`` and ``T_c = sum p * M_c`` (every candidate's ``T_c``
    in one batched product with the masks) and V centred on its mean (attention outputs are
    weighted means, so the mean cancels), all measured candidates go through ONE batched matmul
    per key chunk (weights ``[B*H, C' * R, n]``). In float32 (CPU, float32 models) the weights are
    ``p * M_c`` and the error ``|(p * M_c) @ V / T_c - ref|^2``. With ``weights_dtype`` bfloat16
    (the default on a GPU for half-precision models: tensor cores, half the bytes) the weights are
    ``Delta_c = p * (M_c / T_c - 1 / T)``, the difference of the two attention distributions, so
    the rounding stays relative to the error itself (no two nearly equal outputs are subtracted).
    Dense-covering candidates (mask all True at the rows) have error 0 and are not computed.
    One host sync per call: rows whose masked keys all underflow against the row max take the
    exact masked softmax.
    """
    cm = masks if isinstance(masks, CandidateMasks) else CandidateMasks(rows, masks, skip)
    rows = cm.rows
    if layout == "blhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    B, H, L, D = k.shape
    R, C, dev = rows.numel(), cm.candidates, q.device
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = _row_scores(q, k, rows, kv_len, scale)                       # [B, H, R, L]
    row_ok = torch.ones(B, 1, R, dtype=torch.bool, device=dev)
    if kv_len is not None:  # padded query rows do not count
        row_ok = (rows.view(1, -1) < torch.as_tensor(kv_len, device=dev).view(B, 1)).view(B, 1, R)
    row_ok = row_ok.expand(B, H, R).reshape(B * H, R)
    p = s.sub_(s.amax(-1, keepdim=True)).exp_().view(B * H, R, L)  # in place: s is not kept
    total = p.sum(-1)                                                # [BH, R], >= 1 on valid rows
    vf = v.float().reshape(B * H, L, D)
    mean = vf.mean(1, keepdim=True)
    vc = vf.sub_(mean) if v.dtype != torch.float32 else vf - mean  # centred V [BH, L, D] (vf is a copy)
    del vf
    ref_c = _long_bmm(p, vc)                                         # dense output - mean, times T
    ref = torch.where(row_ok[..., None], (ref_c / total[..., None] + mean).nan_to_num(0.0), 0.0)
    head_energy = ref.pow(2).sum((1, 2)).view(B, H).sum(0)           # [H]
    num = torch.zeros(H, C, dtype=torch.float64, device=dev)
    for c in range(C):
        if cm.skip[c]:
            num[:, c] = head_energy.double()
    Cm = len(cm.measured)
    if Cm:
        # T_c of all candidates: per row, [BH, L] @ [L, C']
        part = torch.bmm(p.transpose(0, 1), cm.by_row).permute(1, 2, 0)  # [BH, C', R]
        lost = (part == 0) & row_ok[:, None, :]  # every attended key underflowed: exact path below
        inv_part = torch.where(part > 0, 1.0 / part, 0.0)
        wd = weights_dtype or _weights_dtype(q)
        chunk = max(1, GROUP_BYTES // (B * H * Cm * R * torch.finfo(wd).bits // 8))
        acc = torch.zeros(B * H, Cm * R, D, dtype=torch.float32, device=dev)
        if wd == torch.float32:
            # float32: (p * M_c) @ V_centred / T_c - (ref - mean); the subtraction loses ~1e-7 of |ref - mean|
            for start in range(0, L, chunk):
                end = min(L, start + chunk)
                w = p[:, None, :, start:end] * cm.inner[None, :, :, start:end]              # [BH, C', R, n]
                acc.baddbmm_(w.view(B * H, Cm * R, end - start), vc[:, start:end])
            diff = acc.view(B * H, Cm, R, D) * inv_part[..., None] - (ref_c / total[..., None])[:, None]
        else:
            # half precision: Delta_c = p * (M_c / T_c - 1 / T) is rounded, not two nearly equal outputs
            inside = (inv_part - (1.0 / total)[:, None, :]).to(wd)[..., None]             # [BH, C', R, 1]
            outside = (-(1.0 / total)).to(wd)[:, None, :, None]                            # [BH, 1, R, 1]
            vw = vc.to(wd)
            for start in range(0, L, chunk):
                end = min(L, start + chunk)
                w = torch.where(cm.inner[None, :, :, start:end], inside, outside)          # [BH, C', R, n]
                w.mul_(p[:, None, :, start:end].to(wd))
                acc += torch.bmm(w.view(B * H, Cm * R, end - start), vw[:, start:end]).float()
            diff = acc.view(B * H, Cm, R, D)
        err = diff.pow(2).sum(-1)                                                          # [BH, C', R]
        err = torch.where(row_ok[:, None, :], err.nan_to_num(0.0), 0.0)
        if bool(lost.any()):
            err = _exact_rows(q, k, v, rows, cm, kv_len, ref, err, lost, scale)
        num[:, cm.measured] = err.view(B, H, Cm, R).sum((0, 3)).double()
    return num, ref.pow(2).sum().double()


def _row_scores(q, k, rows, kv_len, scale) -> torch.Tensor:
    """float32 scores [B, H, R, L] of the sampled query rows (bhld), keys past kv_len at -inf."""
    s = torch.matmul(q[:, :, rows].float(), k.float().transpose(-1, -2)).mul_(scale)
    if kv_len is not None:
        L = k.shape[2]
        valid = torch.arange(L, device=s.device).view(1, L) < torch.as_tensor(kv_len, device=s.device).view(-1, 1)
        s.masked_fill_(~valid[:, None, None, :], float("-inf"))
    return s


def _long_bmm(a: torch.Tensor, b: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """``a [N, M, K] @ b [N, K, P]`` for a long K and a small M x P output. On a GPU, K is cut into
    ``splits`` slices that run as one batch and are summed (a split-K: as one product per batch
    entry, the small output keeps a handful of the GPU's multiprocessors busy for the whole K)."""
    N, M, K = a.shape
    if splits is None:
        splits = min(32, K // 1024) if a.is_cuda else 1
    if splits <= 1:
        return torch.bmm(a, b)
    part = -(-K // splits)
    pad = part * splits - K
    if pad:
        a = torch.nn.functional.pad(a, (0, pad))
        b = torch.nn.functional.pad(b, (0, 0, 0, pad))
    a = a.reshape(N, M, splits, part).transpose(1, 2).reshape(N * splits, M, part)
    out = torch.bmm(a, b.reshape(N * splits, part, b.shape[-1]))
    return out.view(N, splits, M, -1).sum(1)


def _exact_rows(q, k, v, rows, cm: CandidateMasks, kv_len, ref, err, lost, scale):
    """Errors of the rows ``lost`` [BH, C', R] flags (all their masked keys underflowed against the
    row max) from the exact masked softmax, one candidate at a time (a rare path)."""
    B, H, L, D = k.shape
    s = _row_scores(q, k, rows, kv_len, scale).reshape(B * H, -1, L)
    vf = v.float().reshape(B * H, L, D)
    err = err.clone()
    for i in lost.any(2).any(0).nonzero().flatten().tolist():
        exact = torch.softmax(s.masked_fill(~cm.inner[i][None], float("-inf")), -1)
        rows_err = (torch.bmm(exact, vf).nan_to_num(0.0) - ref).pow(2).sum(-1)  # [BH, R]
        err[:, i] = torch.where(lost[:, i], rows_err, err[:, i])
    return err


def run_patterns(patterns: tuple, q, k, v, *, geometry: VideoGeometry, layout: str, dense: Callable, kv_len=None):
    """One layer with a pattern per head: ``dense`` when all are Dense, else the compiled plan
    (Triton on a supported GPU with a mixed layer's Dense heads through ``dense``, as the engine
    runs them; the reference backend elsewhere). Plans are cached per head mix;
    Triton launches reuse the config already tuned for the nearest work bucket instead of
    autotuning each new one (head mixes with more or fewer skipped heads change the bucket)."""
    if all(isinstance(p, Dense) for p in patterns):
        return dense(q, k, v)
    from .plan import compile_layer

    bm, bn = _tiles(q.shape[-1], q.device)
    plan = compile_layer(tuple(patterns), geometry, bm, bn, q.device)
    if _backend(q) != "triton":
        return plan.run(q, k, v, layout=layout, kv_len=kv_len, backend="reference")
    from ..kernels.triton_attention import reuse_tuned_configs

    with reuse_tuned_configs():  # Dense heads of a mixed layer go to `dense`, as the engine runs them
        return plan.run(q, k, v, layout=layout, kv_len=kv_len, backend="triton", dense=dense)


def _backend(q: torch.Tensor) -> str:
    from ..kernels import supports

    return "triton" if q.is_cuda and supports(q) is None else "reference"


@functools.lru_cache(maxsize=16)
def _tiles(head_dim: int, device: torch.device) -> tuple[int, int]:
    from .cost import default_tiles

    return default_tiles(head_dim, device)


# ---------------------------------------------------------------------------------------- driver


@dataclass
class SearchResult:
    """A finished search: the strategy (meta carries the record), what it predicts, the latents."""

    strategy: Any
    selection: Selection
    record: SearchRecord
    dense_latents: Any
    closed_latents: Any
    pass_seconds: dict = field(default_factory=dict)  # wall time of each pass run here
    call_seconds: dict = field(default_factory=dict)  # "<phase> <kind>" -> (seconds, calls), see SearchController


def finalize(state: SearchState, settings: SearchSettings, *, meta: dict | None = None):
    """Bucketed record and the final selection + Strategy from a state (dense pass at least done)."""
    from .patterns import pattern_from_dict

    candidates = tuple(pattern_from_dict(d) for d in state.candidates)
    of_step, edges = bucket_plan(state.sigmas, settings.buckets)
    weights = step_weights(state.sigmas)
    B = len(edges) - 1
    table = state.table()
    T, L, H, C = table.shape
    errors = torch.zeros(B, L, H, C, dtype=torch.float64)
    w_b = torch.zeros(B, dtype=torch.float64)
    n_b = torch.zeros(B, dtype=torch.float64)
    for i in range(T):
        errors[of_step[i]] += table[i]
        w_b[of_step[i]] += weights[i]
        n_b[of_step[i]] += 1
    errors /= n_b.view(B, 1, 1, 1)
    # the file stores float32: select on exactly what a re-selection will read back
    record = SearchRecord(candidates, errors.float(), torch.tensor(state.cost, dtype=torch.float32),
                          w_b.float(), n_b.float(), float(state.dense_layer))
    sel = select(candidates, record.errors, record.cost, record.step_weights, record.bucket_steps,
                 record.dense_layer, target_speedup=settings.target_speedup, error_budget=settings.error_budget,
                 outlier_ratio=settings.outlier_ratio, max_warmup=settings.max_warmup)
    search_meta = {k: v for k, v in asdict(settings).items() if k not in ("densities", "families")}
    search_meta.update(densities=list(settings.densities), families=list(settings.families), lam=sel.lam,
                       dense_layer=record.dense_layer, predicted_speedup=sel.predicted_speedup,
                       predicted_error=sel.predicted_error, cost_unit=(meta or {}).get("cost_unit", ""))
    full_meta = dict(meta or {})
    full_meta.update(record=record, search=search_meta, geometry=state.geometry,
                     schedule={"sigmas": [float(s) for s in state.sigmas], **full_meta.get("schedule", {})})
    return to_strategy(sel, candidates, edges, full_meta), sel, record


def search(run: Callable[[Any], Any], *, sigmas: Sequence[float], layers: int, settings: SearchSettings,
           progress: Callable[[int, int], None] | None = None, cancel=None, state_path: str | None = None,
           meta: dict | None = None, cost_model_factory=None) -> SearchResult:
    """Search a strategy. ``run(controller)`` runs the model's sampling loop with ``controller``
    installed at its call sites (calling ``controller.begin_step(sigma, step)`` before each step,
    ``sigmas`` being those steps' sigmas) and returns the final latents.

    ``progress(done, total)`` counts steps over both passes; ``cancel`` is a callable returning
    True, or an object with ``is_set()``; on cancel the state is saved to ``state_path`` (also
    after every step) and :class:`SearchCancelled` is raised. Calling again with the same
    ``state_path`` and settings resumes (measured steps are replayed, not measured again).
    """
    sigmas = [float(s) for s in sigmas]
    state = None
    if state_path and os.path.isfile(state_path):
        state = SearchState.load(state_path)
        if state.settings != _settings_doc(settings) or state.sigmas != sigmas or state.layers != layers:
            raise ValueError(f"{state_path} holds a search with other settings, schedule or model; "
                             "delete it or pick another state path")
    if state is None:
        state = SearchState(settings=_settings_doc(settings), sigmas=sigmas, layers=layers)
    T = len(sigmas)
    passes = 2 if settings.closed_loop else 1
    total = passes * T
    stop = (cancel.is_set if hasattr(cancel, "is_set") else cancel) if cancel is not None else None

    def on_step(step: int) -> None:
        if step > state.done_steps:  # steps before `step` are finished
            state.done_steps = step
            if state.phase == "closed":  # keep to the budget with what the closed pass measured
                state.lam = finalize(state, settings)[1].lam
            if state_path:
                state.save(state_path)
        if progress is not None:
            progress(PHASES.index(state.phase) * T + step, total)
        if stop is not None and stop():
            if state_path:
                state.save(state_path)
            raise SearchCancelled(state)

    controller = SearchController(state, settings, cost_model_factory=cost_model_factory, on_step=on_step)
    dense_latents = closed_latents = None
    seconds = {}
    if state.phase == "dense":
        started = time.perf_counter()
        dense_latents = run(controller)
        seconds["dense"] = time.perf_counter() - started
        _finish_pass(state, settings, "closed" if settings.closed_loop else "done", state_path)
        if progress is not None:
            progress(T, total)
    if state.phase == "closed":
        controller._seen.clear()
        started = time.perf_counter()
        closed_latents = run(controller)
        seconds["closed"] = time.perf_counter() - started
        _finish_pass(state, settings, "done", state_path)
        if progress is not None:
            progress(total, total)
    strategy, sel, record = finalize(state, settings, meta=meta)
    return SearchResult(strategy, sel, record, dense_latents, closed_latents, seconds, controller.call_seconds())


def _finish_pass(state: SearchState, settings: SearchSettings, next_phase: str, state_path) -> None:
    if state.num is None:
        raise ValueError("the sampling run made no attention call through the search controller: is it "
                         "installed at the model's self-attention sites (see any warning above)?")
    if state.phase == "dense":
        _, sel, _ = finalize(state, settings)
        state.lam = sel.lam
        state.warmup_buckets = sel.warmup_buckets
        state.dense_layers = sorted(sel.dense_layers)
    state.phase = next_phase
    state.done_steps = 0
    if state_path:
        state.save(state_path)


def measure_strategy(run: Callable[[Any], Any], strategy, record: SearchRecord, *, sigmas: Sequence[float],
                     layers: int, settings: SearchSettings, cost_model_factory=None) -> dict:
    """Run ``strategy`` through ``run`` (closed loop) while measuring, at every call, the relative
    error of the patterns it uses, exactly as the search measures candidates. Returns the weighted
    total ``measured_error`` (comparable to :attr:`Selection.predicted_error` of the same strategy)
    and the final latents; the strategy's patterns must be among ``record.candidates``."""
    sigmas = [float(s) for s in sigmas]
    index = {p: i for i, p in enumerate(record.candidates)}
    dense_idx = next(i for i, p in enumerate(record.candidates) if isinstance(p, Dense))
    state = SearchState(settings=_settings_doc(settings), sigmas=sigmas, layers=layers, heads=strategy.heads,
                        candidates=[p.to_dict() for p in record.candidates],
                        cost=[float(c) for c in record.cost], dense_layer=record.dense_layer, phase="closed")
    state.allocate(strategy.heads, len(record.candidates))
    for i, sigma in enumerate(sigmas):
        for l in range(layers):
            pats = strategy.patterns_for(sigma, l)
            if pats is None:
                state.decision[i, l] = dense_idx
            else:
                missing = [p for p in pats if p not in index]
                if missing:
                    raise ValueError(f"pattern {missing[0]} of the strategy is not among the record's candidates")
                state.decision[i, l] = torch.tensor([index[p] for p in pats], dtype=torch.int16)
    controller = SearchController(state, settings, cost_model_factory=cost_model_factory, decide=False)
    latents = run(controller)
    rel = state.num[1] / state.den[1].clamp_min(1e-30)[..., None, None]
    chosen = torch.gather(rel, -1, state.decision.long().unsqueeze(-1)).squeeze(-1)  # [T, L, H]
    weights = torch.tensor(step_weights(sigmas), dtype=torch.float64)
    return {"measured_error": float((chosen.sum((1, 2)) * weights).sum()), "latents": latents}


def _settings_doc(settings: SearchSettings) -> dict:
    return json.loads(json.dumps(asdict(settings)))
