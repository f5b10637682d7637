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
GROUP_ELEMENTS = 1 << 25  # score elements of candidates evaluated in one batch (128 MiB in fp32)


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
        self.cost_model = self._cost_model_factory(geometry, heads, head_dim, dtype, device)
        if st.candidates:
            self._candidates = tuple(pattern_from_dict(d) for d in st.candidates)
        else:
            self._candidates = candidate_set(geometry, self.settings.densities, self.settings.families)
            st.candidates = [p.to_dict() for p in self._candidates]
            st.cost = [float(c) for c in self.cost_model.costs(self._candidates)]
            st.dense_layer = float(self.cost_model.dense_layer())
            st.geometry = _geom_dict(geometry)
            st.allocate(heads, len(self._candidates))
        if st.heads != heads:
            raise ValueError(f"search state has {st.heads} heads, the model {heads}")
        self._cost = torch.tensor(st.cost, dtype=torch.float64)
        self._dense_idx = next(i for i, p in enumerate(self._candidates) if isinstance(p, Dense))

    def _rows_and_masks(self, geometry: VideoGeometry, device):
        key = (geometry, str(device))
        if key not in self._masks:
            L = geometry.seq_len
            R = min(self.settings.rows, L)
            gen = torch.Generator().manual_seed(self.settings.seed)
            # stratified: one row per equal slice of the sequence, at a random offset in it
            starts = torch.arange(R, dtype=torch.float64) * L / R
            offs = torch.rand(R, generator=gen, dtype=torch.float64) * (L / R)
            rows = torch.unique((starts + offs).floor().long().clamp(0, L - 1))
            rules = torch.tensor([p.head_rule(geometry) for p in self._candidates], device=device)
            rows = rows.to(device)
            # the kernels' own rule (the exact function every backend computes), built on the device
            masks = rule_mask(rules, geometry.prefix, geometry.frames, geometry.height, geometry.width,
                              rows, torch.arange(L, device=device))
            self._masks[key] = (rows, masks)
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
                self._measure(q, k, v, layout, geometry, kv_len, phase, step, layer)
            return dense(q, k, v)
        forced = bucket < st.warmup_buckets or layer in st.dense_layers
        if forced:
            return dense(q, k, v)
        if not self.decide and bool((st.decision[step, layer] == self._dense_idx).all()):
            return dense(q, k, v)
        if not replay:
            errs = self._measure(q, k, v, layout, geometry, kv_len, phase, step, layer)
            if first_call and self.decide:
                w = self.weights[step]
                score = self._cost.view(1, -1) + st.lam * w * errs
                st.decision[step, layer] = score.argmin(-1).to(torch.int16)
        chosen = tuple(self._candidates[int(c)] for c in st.decision[step, layer])
        return run_patterns(chosen, q, k, v, geometry=geometry, layout=layout, dense=dense, kv_len=kv_len)

    def _measure(self, q, k, v, layout, geometry, kv_len, phase, step, layer) -> torch.Tensor:
        """Add this call's squared errors to the table; return the relative errors [H, C] so far."""
        rows, masks = self._rows_and_masks(geometry, q.device)
        num, den = candidate_errors(q, k, v, rows, masks, layout=layout, kv_len=kv_len,
                                    skip=[isinstance(p, Skip) for p in self._candidates])
        st = self.state
        st.num[phase, step, layer] += num.cpu()
        st.den[phase, step, layer] += den.cpu()
        return st.num[phase, step, layer] / max(float(st.den[phase, step, layer]), 1e-30)


def _geom_dict(g: VideoGeometry) -> dict:
    return {k: int(getattr(g, k)) for k in ("frames", "height", "width", "prefix", "suffix")}


def candidate_errors(q, k, v, rows, masks, *, layout: str, kv_len=None, skip=None):
    """Squared error of each candidate vs dense on the sampled query ``rows``.

    masks: bool [C, R, L] (row r of candidate c). Returns (num [H, C], den scalar): num sums
    ``|O_c - O_dense|^2`` over batch, rows and channels per head; den sums ``|O_dense|^2`` over
    batch, rows, heads and channels. Memory: [B, H, R, L] scores, never an L x L map.
    """
    if layout == "blhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    B, H, L, D = k.shape
    scale = 1.0 / math.sqrt(q.shape[-1])
    qr = q[:, :, rows].float()
    s = torch.matmul(qr, k.float().transpose(-1, -2)) * scale  # [B, H, R, L]
    row_ok = torch.ones(B, 1, len(rows), 1, dtype=torch.bool, device=s.device)
    if kv_len is not None:  # padded keys are masked; padded query rows do not count
        lens = torch.as_tensor(kv_len, device=s.device).view(B, 1)
        valid = torch.arange(L, device=s.device).view(1, L) < lens
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        row_ok = (rows.view(1, -1) < lens).view(B, 1, -1, 1)

    # one exp for all candidates: a candidate's output is (p * mask) @ v / sum(p * mask), with p the
    # row-max-shifted exponentials of the dense scores
    vf = v.float()
    p = torch.exp(s - s.amax(-1, keepdim=True))  # [B, H, R, L]; rows of padding give NaN, cleared below

    def attend(weights):
        total = weights.sum(-1, keepdim=True)
        return (torch.matmul(weights, vf) / total).nan_to_num(0.0) * row_ok, total

    ref, _ = attend(p)  # [B, H, R, D]
    den = ref.pow(2).sum()
    C = masks.shape[0]
    num = torch.zeros(H, C, dtype=torch.float64, device=s.device)
    skip = skip or [False] * C
    computed = [c for c in range(C) if not skip[c]]
    for c in range(C):
        if skip[c]:
            num[:, c] = ref.pow(2).sum((0, 2, 3)).double()
    group = max(1, GROUP_ELEMENTS // s.numel())  # candidates evaluated together, bounded memory
    for start in range(0, len(computed), group):
        cs = computed[start:start + group]
        out, total = attend(p.unsqueeze(0) * masks[cs][:, None, None])  # [G, B, H, R, D]
        lost = (total == 0) & row_ok  # every attended key underflowed against the row max: exact path
        if bool(lost.any()):
            exact = torch.softmax(s.unsqueeze(0).masked_fill(~masks[cs][:, None, None], float("-inf")), -1)
            out = torch.where(lost, torch.matmul(exact, vf).nan_to_num(0.0), out)
        num[:, cs] = (out - ref).pow(2).sum((1, 3, 4)).T.double()
    return num, den.double()


def run_patterns(patterns: tuple, q, k, v, *, geometry: VideoGeometry, layout: str, dense: Callable, kv_len=None):
    """One layer with a pattern per head: ``dense`` when all are Dense, else the compiled plan
    (Triton on a supported GPU, the reference backend elsewhere)."""
    if all(isinstance(p, Dense) for p in patterns):
        return dense(q, k, v)
    from ..kernels import supports
    from .cost import default_tiles
    from .plan import compile_layer

    backend = "triton" if q.is_cuda and supports(q) is None else "reference"
    bm, bn = default_tiles(q.shape[-1], q.device)
    plan = compile_layer(tuple(patterns), geometry, bm, bn, q.device)
    return plan.run(q, k, v, layout=layout, kv_len=kv_len, backend=backend)


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
    return SearchResult(strategy, sel, record, dense_latents, closed_latents, seconds)


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
