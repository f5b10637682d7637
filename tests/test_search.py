"""The closed-loop search on synthetic heads with planted patterns, its error estimate, budget,
progress, cancellation and resume."""

import math
import threading

import pytest
import torch

from sparse_vdit.strategies.geometry import VideoGeometry
from sparse_vdit.strategies.patterns import Dense, Skip
from sparse_vdit.strategies.search import (SearchCancelled, SearchSettings, bucket_plan, candidate_errors,
                                           candidate_set, search, step_weights)

GEOM = VideoGeometry(3, 4, 6)  # L = 72 <= head_dim: logits can be planted exactly
D = 128
FAMILIES = ("diagonal", "multi_diagonal", "local_window", "vertical_stripe")


class DensityCost:
    """FLOP-proportional cost at token granularity (the tiny geometry is one tile)."""

    def __init__(self, geom, heads, head_dim, dtype, device):
        self.geom, self.heads = geom, heads
        self.gpu, self.unit = "cpu", "dense=1"

    def costs(self, patterns):
        return torch.tensor([p.density(self.geom) for p in patterns], dtype=torch.float64)

    def dense_layer(self):
        return float(self.heads)


def _sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _planted_qk(logits: torch.Tensor, gen):
    """q, k [L, D] with q k^T / sqrt(D) == logits (exact rank-L factorisation)."""
    L = logits.shape[0]
    u, s, vh = torch.linalg.svd(logits.double())
    root = (s * math.sqrt(D)).sqrt()
    q = torch.zeros(L, D, dtype=torch.float64)
    k = torch.zeros(L, D, dtype=torch.float64)
    q[:, :L] = u * root
    k[:, :L] = vh.T * root
    rot = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))[0]
    return (q @ rot).float(), (k @ rot).float()


def _planted_layer(kinds, candidates, gen, beta=14.0):
    """One layer [1, H, L, D]: per head a planted family pattern, 'dense' (random global) or 'skip'."""
    L = GEOM.seq_len
    qs, ks, vs = [], [], []
    for kind in kinds:
        v = torch.randn(L, D, generator=gen)
        if kind == "dense":
            logits = 3.0 * torch.randn(L, L, generator=gen, dtype=torch.float64)
        elif kind == "skip":
            logits = torch.randn(L, L, generator=gen, dtype=torch.float64)
            v = v * 1e-5
        else:
            fam = [p for p in candidates if p.name == kind]
            pattern = fam[int(torch.randint(0, len(fam), (1,), generator=gen))]
            logits = beta * pattern.token_mask(GEOM).double() + 0.1 * torch.randn(L, L, generator=gen, dtype=torch.float64)
        q, k = _planted_qk(logits, gen)
        qs.append(q), ks.append(k), vs.append(v)
    return torch.stack(qs)[None], torch.stack(ks)[None], torch.stack(vs)[None]


def _loop(layers_qkv, sigmas, calls=None, tell=True):
    """A fake sampling loop: each step calls every layer's site with fixed q/k/v."""

    def run(controller):
        for i, s in enumerate(sigmas):
            if tell:
                controller.begin_step(s, i)
            for l, (q, k, v) in enumerate(layers_qkv):
                out = controller.attention(q, k, v, layer=l, sigma=s, geometry=GEOM, layout="bhld", dense=_sdpa)
                assert out.shape == q.shape and torch.isfinite(out).all()
                if calls is not None:
                    calls.append((i, l))
        return torch.zeros(1)

    return run


def test_candidate_set_is_stated():
    cands = candidate_set(GEOM, (0.1, 0.3))
    assert cands[0] == Dense() and cands[1] == Skip()
    assert {p.name for p in cands[2:]} == set(FAMILIES)
    assert len(set(cands)) == len(cands)


@pytest.mark.parametrize("spread", [1.0, 30.0])  # 30: logits so spread that masked rows underflow
def test_candidate_errors_match_float64(spread):
    gen = torch.Generator().manual_seed(1)
    B, H, L = 2, 3, GEOM.seq_len
    q, k, v = (torch.randn(B, L, H, 16, generator=gen) for _ in range(3))
    q = q * spread
    cands = candidate_set(GEOM, (0.1, 0.3))
    rows = torch.tensor([0, 5, 33, 71])
    masks = torch.stack([p.token_mask(GEOM, rows) for p in cands])
    kv_len = torch.tensor([L, L - 9])
    num, den = candidate_errors(q, k, v, rows, masks, layout="blhd", kv_len=kv_len,
                                skip=[isinstance(p, Skip) for p in cands])
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    s = qd[:, :, rows] @ kd.transpose(-1, -2) / 4.0
    valid = torch.arange(L)[None] < kv_len[:, None]
    s = s.masked_fill(~valid[:, None, None], -math.inf)
    row_ok = (rows[None] < kv_len[:, None])[:, None, :, None]  # padded query rows do not count
    ref = (torch.softmax(s, -1) @ vd).nan_to_num(0.0) * row_ok
    assert den.item() == pytest.approx(ref.pow(2).sum().item(), rel=1e-5)
    for c, p in enumerate(cands):
        out = torch.zeros_like(ref) if isinstance(p, Skip) else \
            (torch.softmax(s.masked_fill(~masks[c], -math.inf), -1) @ vd).nan_to_num(0.0) * row_ok
        want = (out - ref).pow(2).sum((0, 2, 3))
        assert torch.allclose(num[:, c], want, rtol=1e-4, atol=1e-9), p


def test_step_weights_and_buckets():
    sig = [1.0, 0.9, 0.6, 0.2]
    w = step_weights(sig)
    assert w[0] == pytest.approx(1.0)                  # dt / max(1 - 1, dt)
    assert w[2] == pytest.approx(0.4 / 0.4)
    assert w[3] == pytest.approx(0.2 / 0.8)
    of_step, edges = bucket_plan(sig, 2)
    assert of_step == [0, 0, 1, 1] and edges[1] == pytest.approx(0.75) and edges[-1] == 0.0
    assert all(a > b for a, b in zip(edges, edges[1:]))
    with pytest.raises(ValueError, match="descending"):
        bucket_plan([0.5, 0.7], None)
    with pytest.raises(ValueError, match="exactly one budget"):
        SearchSettings(target_speedup=2.0, error_budget=0.1)


def test_planted_patterns_found():
    gen = torch.Generator().manual_seed(0)
    cands = candidate_set(GEOM, (0.1, 0.2, 0.35))
    kinds = [list(FAMILIES) + ["dense", "skip"], ["skip", "dense"] + list(FAMILIES)[::-1],
             list(FAMILIES[1:]) + ["dense", "skip", FAMILIES[0]]]
    layers = [_planted_layer(k, cands, gen) for k in kinds]
    settings = SearchSettings(target_speedup=None, error_budget=1e-4, densities=(0.1, 0.2, 0.35), rows=72,
                              outlier_ratio=1e9)
    res = search(_loop(layers, [0.5]), sigmas=[0.5], layers=3, settings=settings, cost_model_factory=DensityCost)
    got = [[p.name for p in res.strategy.patterns[0][l]] for l in range(3)]
    hits = sum(g == w for gl, wl in zip(got, kinds) for g, w in zip(gl, wl))
    assert hits / 18 >= 0.95, (got, kinds)
    assert res.selection.predicted_error <= 1e-4


def _random_layers(n, heads=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    L = GEOM.seq_len
    out = []
    for _ in range(n):
        pos = torch.randn(L, 16, generator=gen)
        q = torch.randn(1, heads, L, D, generator=gen) + 2 * pos.repeat(1, D // 16)
        out.append((q, q + 0.3 * torch.randn(1, heads, L, D, generator=gen), torch.randn(1, heads, L, D, generator=gen)))
    return out


def test_budget_met_and_progress_monotone():
    sig = [0.95, 0.8, 0.5, 0.2]
    seen = []
    settings = SearchSettings(target_speedup=2.5, densities=(0.1, 0.3), rows=24)
    res = search(_loop(_random_layers(2), sig), sigmas=sig, layers=2, settings=settings,
                 progress=lambda d, t: seen.append((d, t)), cost_model_factory=DensityCost)
    assert res.selection.predicted_speedup >= 2.5 * (1 - 1e-9)
    assert seen[-1] == (8, 8) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert res.strategy.meta["search"]["target_speedup"] == 2.5
    assert res.record.errors.shape[:3] == (4, 2, 4)


def test_cond_uncond_calls_share_one_decision():
    sig = [0.9, 0.4]
    layers = _random_layers(2, seed=3)
    decisions = {}

    def run(controller):
        for i, s in enumerate(sig):
            controller.begin_step(s, i)
            for l, (q, k, v) in enumerate(layers):
                for call in range(2):  # cond then uncond, separate forwards
                    controller.attention(q + call * 0.05, k, v, layer=l, sigma=s, geometry=GEOM, layout="bhld",
                                         dense=_sdpa)
                    st = controller.state
                    if st.phase == "closed":
                        decisions.setdefault((i, l), []).append(st.decision[i, l].clone())
        return torch.zeros(1)

    settings = SearchSettings(target_speedup=3.0, densities=(0.1, 0.3), rows=16, max_warmup=0.0)
    search(run, sigmas=sig, layers=2, settings=settings, cost_model_factory=DensityCost)
    assert decisions and all(torch.equal(a, b) for a, b in decisions.values())


def test_cancel_then_resume_gives_the_same_strategy(tmp_path):
    sig = [0.95, 0.7, 0.4, 0.1]
    layers = _random_layers(2, seed=5)
    settings = SearchSettings(target_speedup=2.0, densities=(0.1, 0.3), rows=16)
    full = search(_loop(layers, sig), sigmas=sig, layers=2, settings=settings, cost_model_factory=DensityCost)

    stop = threading.Event()
    state_path = str(tmp_path / "state.safetensors")

    def progress(done, total):
        if done == 6:  # in the closed pass
            stop.set()

    with pytest.raises(SearchCancelled) as e:
        search(_loop(layers, sig), sigmas=sig, layers=2, settings=settings, progress=progress, cancel=stop,
               state_path=state_path, cost_model_factory=DensityCost)
    assert e.value.state.phase == "closed" and e.value.state.done_steps == 2
    calls = []
    resumed = search(_loop(layers, sig, calls), sigmas=sig, layers=2, settings=settings, state_path=state_path,
                     cost_model_factory=DensityCost)
    assert resumed.strategy.patterns == full.strategy.patterns
    assert torch.equal(resumed.record.errors, full.record.errors)
    with pytest.raises(ValueError, match="other settings"):
        search(_loop(layers, sig), sigmas=sig, layers=2, settings=SearchSettings(target_speedup=3.0),
               state_path=state_path, cost_model_factory=DensityCost)


def test_steps_follow_sigma_when_the_loop_does_not_tell():
    sig = [0.95, 0.7, 0.4]
    layers = _random_layers(2, seed=7)
    settings = SearchSettings(target_speedup=2.0, densities=(0.1, 0.3), rows=16)
    told = search(_loop(layers, sig), sigmas=sig, layers=2, settings=settings, cost_model_factory=DensityCost)
    seen = []
    untold = search(_loop(layers, sig, tell=False), sigmas=sig, layers=2, settings=settings,
                    progress=lambda d, t: seen.append(d), cost_model_factory=DensityCost)
    assert untold.strategy.patterns == told.strategy.patterns
    assert torch.equal(untold.record.errors, told.record.errors)
    assert seen == [0, 1, 2, 3, 3, 4, 5, 6]


def test_a_failed_first_call_leaves_no_half_made_state():
    # the first call's set-up raises (the call site then runs dense, as on an fp32 model whose cost
    # model could not measure): the next call must set up again, not crash on missing tables
    failures = [1]

    class FlakyCost(DensityCost):
        def costs(self, patterns):
            if failures:
                failures.pop()
                raise ValueError("cannot measure this dtype")
            return super().costs(patterns)

    sig = [0.9, 0.4]
    layers = _random_layers(2)
    settings = SearchSettings(target_speedup=2.0, densities=(0.1, 0.3), rows=24)
    fell_back = []

    def run(controller):
        for i, s in enumerate(sig):
            controller.begin_step(s, i)
            for l, (q, k, v) in enumerate(layers):
                try:
                    controller.attention(q, k, v, layer=l, sigma=s, geometry=GEOM, layout="bhld", dense=_sdpa)
                except ValueError:
                    fell_back.append((i, l))  # what a call site does: dense, one warning
        return torch.zeros(1)

    res = search(run, sigmas=sig, layers=2, settings=settings, cost_model_factory=FlakyCost)
    assert fell_back == [(0, 0)]
    assert res.record.errors.shape[:3] == (2, 2, 4)

