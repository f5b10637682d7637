"""The search's cost work: masks cached per geometry, the batched error estimate (float32 and the
GPU's bfloat16 form) against float64, results unchanged by the rewrite, per-call timings, and the
closed pass's Triton launches reusing a tuned config instead of autotuning every head mix."""

import math

import pytest
import torch

from sparse_vdit.strategies import search as S
from sparse_vdit.strategies.geometry import VideoGeometry
from sparse_vdit.strategies.patterns import Dense, Diagonal, LocalWindow, Skip
from sparse_vdit.strategies.search import (CandidateMasks, SearchController, SearchSettings, SearchState,
                                           candidate_errors, candidate_set, sample_masks, search)
from test_search import DensityCost

GEOM = VideoGeometry(3, 4, 6)


def _layers(n, heads=4, seed=0, dim=64):
    """Layers whose heads attend along a shared positional code with a per-head sharpness."""
    gen = torch.Generator().manual_seed(seed)
    L = GEOM.seq_len
    pos = torch.randn(L, dim, generator=gen)
    out = []
    for _ in range(n):
        a = torch.rand(1, heads, 1, 1, generator=gen) * 3
        q = torch.randn(1, heads, L, dim, generator=gen) + a * pos
        k = torch.randn(1, heads, L, dim, generator=gen) + a * pos
        out.append((q, k, torch.randn(1, heads, L, dim, generator=gen)))
    return out


def _loop(layers, sigmas):
    def run(controller):
        for i, s in enumerate(sigmas):
            controller.begin_step(s, i)
            for l, (q, k, v) in enumerate(layers):
                for call in range(2):  # cond, uncond
                    controller.attention(q + 0.05 * call, k, v, layer=l, sigma=s, geometry=GEOM, layout="bhld",
                                         dense=torch.nn.functional.scaled_dot_product_attention)
        return torch.zeros(1)

    return run


def test_masks_are_built_once_per_geometry_and_equal_fresh_ones():
    settings = SearchSettings(densities=(0.1, 0.3), rows=16)
    state = SearchState(settings={}, sigmas=[1.0], layers=1)
    ctl = SearchController(state, settings)
    ctl._candidates = candidate_set(GEOM, settings.densities)
    probe = ctl._probe(GEOM, torch.device("cpu"))
    assert ctl._probe(GEOM, torch.device("cpu")) is probe  # cached
    rows, masks = sample_masks(ctl._candidates, GEOM, 16, 0, "cpu")
    assert torch.equal(probe.rows, rows) and torch.equal(probe.masks, masks)
    # the kernels' rule and the patterns' own token masks agree at the sampled rows
    assert torch.equal(masks, torch.stack([p.token_mask(GEOM, rows) for p in ctl._candidates]))
    assert probe.skip == [isinstance(p, Skip) for p in ctl._candidates]
    full = masks.flatten(1).all(1)
    assert probe.measured == [c for c in range(len(masks)) if not probe.skip[c] and not full[c]]
    assert 0 not in probe.measured  # Dense is exact: not computed
    assert torch.equal(probe.inner, masks[probe.measured])
    assert torch.equal(probe.by_row, masks[probe.measured].permute(1, 2, 0).float())
    other = VideoGeometry(2, 4, 6)
    assert ctl._probe(other, torch.device("cpu")) is not probe


def _float64_errors(q, k, v, rows, masks, kv_len, cands):
    B, L, H, D = q.shape
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    s = qd[:, :, rows] @ kd.transpose(-1, -2) / math.sqrt(D)
    valid = torch.arange(L)[None] < kv_len[:, None]
    s = s.masked_fill(~valid[:, None, None], -math.inf)
    row_ok = (rows[None] < kv_len[:, None])[:, None, :, None]
    ref = (torch.softmax(s, -1) @ vd).nan_to_num(0.0) * row_ok
    want = torch.zeros(H, len(cands), dtype=torch.float64)
    for c, p in enumerate(cands):
        out = torch.zeros_like(ref) if isinstance(p, Skip) else \
            (torch.softmax(s.masked_fill(~masks[c], -math.inf), -1) @ vd).nan_to_num(0.0) * row_ok
        want[:, c] = (out - ref).pow(2).sum((0, 2, 3))
    return want, ref.pow(2).sum()


@pytest.mark.parametrize("spread", [1.0, 30.0])  # 30: masked rows underflow (the exact path)
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_both_weight_forms_match_float64(spread, weights, monkeypatch):
    monkeypatch.setattr(S, "GROUP_BYTES", 4096)  # several key chunks
    gen = torch.Generator().manual_seed(1)
    B, H, L, D = 2, 3, GEOM.seq_len, 32
    q, k, v = (torch.randn(B, L, H, D, generator=gen) for _ in range(3))
    v = v + 3.0  # a mean far from zero: the bfloat16 form must not lose the error against it
    q = q * spread
    cands = candidate_set(GEOM, (0.1, 0.3))
    rows = torch.tensor([0, 5, 33, 71])
    masks = torch.stack([p.token_mask(GEOM, rows) for p in cands])
    kv_len = torch.tensor([L, L - 9])
    num, den = candidate_errors(q, k, v, rows, CandidateMasks(rows, masks, [isinstance(p, Skip) for p in cands]),
                                layout="blhd", kv_len=kv_len, weights_dtype=weights)
    want, want_den = _float64_errors(q, k, v, rows, masks, kv_len, cands)
    assert den.item() == pytest.approx(want_den.item(), rel=1e-5)
    # float32: rounding only; bfloat16 weights: ~2^-8 relative to each error (not to the output)
    rtol, atol = (1e-4, 1e-9) if weights == torch.float32 else (2e-2, 1e-6 * want_den.item())
    assert torch.allclose(num, want, rtol=rtol, atol=atol), (num - want).abs().max()
    assert num[:, 0].abs().max() == 0.0  # Dense: exactly 0


def test_bfloat16_weights_keep_small_errors_relative():
    """Errors 1e-8..1e-7 of the output energy (V's mean 3): the bfloat16 form stays within 2% of
    float64 on each, because it rounds the difference of the distributions, not two outputs."""
    gen = torch.Generator().manual_seed(1)
    B, H, L, D = 1, 3, GEOM.seq_len, 32
    pos = torch.randn(L, D, generator=gen)
    q = 2.0 * pos[None, :, None, :].expand(B, L, H, D) + 0.1 * torch.randn(B, L, H, D, generator=gen)
    v = torch.randn(B, L, H, D, generator=gen) + 3.0
    cands = candidate_set(GEOM, (0.1, 0.3))
    rows = torch.tensor([0, 5, 33, 71])
    masks = torch.stack([p.token_mask(GEOM, rows) for p in cands])
    want, den = _float64_errors(q, q, v, rows, masks, torch.tensor([L]), cands)
    assert 1e-9 < float((want[:, 2:] / den).max()) < 1e-6
    for weights, rtol in ((torch.float32, 1e-3), (torch.bfloat16, 2e-2)):
        num, _ = candidate_errors(q, q, v, rows, masks, layout="blhd", skip=[isinstance(p, Skip) for p in cands],
                                  weights_dtype=weights)
        assert torch.allclose(num[:, 2:], want[:, 2:], rtol=rtol, atol=0), weights


def test_half_inputs_are_read_not_changed():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, GEOM.seq_len, 2, 32, generator=gen).bfloat16() for _ in range(3))
    keep = v.clone()
    cands = candidate_set(GEOM, (0.1, 0.3))
    rows = torch.tensor([1, 40])
    masks = torch.stack([p.token_mask(GEOM, rows) for p in cands])
    skip = [isinstance(p, Skip) for p in cands]
    half = candidate_errors(q, k, v, rows, masks, layout="blhd", skip=skip)
    full = candidate_errors(q.float(), k.float(), v.float(), rows, masks, layout="blhd", skip=skip)
    assert torch.equal(v, keep)  # V is centred in a copy
    assert torch.allclose(half[0], full[0], rtol=1e-5, atol=1e-9) and torch.allclose(half[1], full[1])


def test_long_k_split_product_matches_bmm():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 5, 1000, generator=gen), torch.randn(3, 1000, 7, generator=gen)
    for splits in (1, 3, 7, 32):
        assert torch.allclose(S._long_bmm(a, b, splits), torch.bmm(a, b), atol=1e-4)


def test_search_decides_as_before_the_batched_estimate():
    """Choices recorded from the per-candidate implementation (commit 50e2ba2) on this fixed input."""
    sig = [0.95, 0.8, 0.5, 0.2]
    res = search(_loop(_layers(3, seed=11), sig), sigmas=sig, layers=3,
                 settings=SearchSettings(target_speedup=2.5, densities=(0.1, 0.3), rows=24),
                 cost_model_factory=DensityCost)
    before = [0, 6, 6, 0, 6, 0, 6, 8, 6, 6, 0, 0, 0, 6, 6, 0, 6, 0, 6, 8, 6, 6, 0, 0,
              0, 6, 6, 0, 6, 0, 6, 8, 6, 6, 0, 0, 1, 6, 6, 9, 6, 9, 6, 8, 6, 6, 7, 1]
    assert res.selection.choice.flatten().tolist() == before
    assert res.selection.predicted_error == pytest.approx(0.027149798521094032, rel=1e-5)
    assert float(res.record.errors.sum()) == pytest.approx(18.568754196166992, rel=1e-6)
    calls = res.call_seconds
    assert calls["dense measure"][1] == 4 * 3 * 2  # every call of the dense pass is measured
    assert 0 < calls["closed measure"][1] <= 4 * 3 * 2
    assert calls["closed sparse"][1] > 0 and all(sec >= 0 for sec, _ in calls.values())


def test_closed_pass_launches_reuse_a_tuned_config(monkeypatch):
    """Under the interpreter: with a config tuned for another work bucket, a launch inside
    reuse_tuned_configs() runs that config directly (no autotune); outside it, the autotuner runs."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    import triton

    from sparse_vdit.kernels import triton_attention as TA
    from sparse_vdit.strategies.plan import compile_layer

    geom = VideoGeometry(2, 4, 4)
    plan = compile_layer((Diagonal(width=0.5), Skip(), LocalWindow(frames=1, height=0.5, width=0.5)), geom,
                         16, 16, "cpu")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, geom.seq_len, 64, generator=gen) for _ in range(3))
    ref = plan.run(q, k, v, backend="reference")
    launched = []
    inner = TA._sparse_attention_fwd.fn
    original = inner.run

    def spy(*args, **kwargs):
        launched.append(kwargs.get("num_warps"))
        return original(*args, **kwargs)

    monkeypatch.setattr(inner, "run", spy)
    cache = dict(getattr(TA._sparse_attention_fwd, "cache", {}))
    monkeypatch.setattr(TA._sparse_attention_fwd, "cache", cache)
    bucket = (triton.cdiv(geom.seq_len, 16) * 2).bit_length()
    dtypes = ("torch.float32",) * 4 + ("torch.int32",) * 7  # q, k, v, out; rules, row_ptr, runs, active, kv, map, slots
    head = (64, 16, 16, "ieee")
    density = plan.tables.density_bucket
    cube = int(plan.tables.uses_cube_order())  # cube-order heads read copies: merged walks are tuned too
    # key: work bucket, density bucket, descriptors, cube-order walk choice, paired-tile choice (1: tuned)
    cache[head + (bucket + 3, density, 1, cube, 1) + dtypes] = triton.Config(
        {"USE_TMA": True, "MERGED_CUBE": bool(cube), "PAIRED": False}, num_warps=2, num_stages=1)
    with TA.reuse_tuned_configs():
        out = plan.run(q, k, v, backend="triton")
    assert launched == [2]  # the tuned config, launched directly
    assert torch.allclose(out, ref, atol=1e-4)
    key = head + (bucket, density, 1, cube, 1) + dtypes
    assert TA._nearest_tuned(key)["num_warps"] == 2
    assert TA._nearest_tuned(key[:9] + ("torch.float16",) * 4 + dtypes[4:]) is None  # other dtype: tune
    assert TA._nearest_tuned((128,) + key[1:]) is None  # other head_dim
    assert TA._nearest_tuned(key[:6] + (0, cube, 1) + dtypes) is None  # no descriptors: a TMA config can't run
    assert TA._nearest_tuned(key[:7] + (1 - cube, 1) + dtypes) is None  # cube-order walks (not) in play
    assert TA._nearest_tuned(key[:8] + (2,) + dtypes) is None  # paired tiles forced: tuned apart
    cache[key] = triton.Config({"USE_TMA": False, "MERGED_CUBE": False, "PAIRED": False}, num_warps=4, num_stages=1)
    assert TA._nearest_tuned(key) is None  # tuned: the autotuner's own


def test_dense_candidate_and_skip_take_no_product():
    probe = CandidateMasks(torch.tensor([0, 1]), torch.stack([torch.ones(2, 5, dtype=torch.bool),
                                                              torch.zeros(2, 5, dtype=torch.bool),
                                                              torch.eye(2, 5, dtype=torch.bool)]),
                           skip=[False, True, False])
    assert probe.measured == [2] and probe.candidates == 3
    assert Dense().token_mask(GEOM).all()


def test_closed_pass_triton_branch_matches_the_reference(monkeypatch):
    """run_patterns' GPU branch (reuse_tuned_configs, Dense heads through `dense`) under the
    interpreter on the CPU gives the reference backend's layer."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter")
    geom = VideoGeometry(2, 4, 4)
    pats = (Diagonal(width=0.5), Dense(), Skip(), LocalWindow(frames=1, height=0.5, width=0.5))
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, geom.seq_len, 4, 64, generator=gen) for _ in range(3))
    dense_calls = []

    def dense(q, k, v):
        dense_calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    ref = S.run_patterns(pats, q, k, v, geometry=geom, layout="blhd", dense=dense)
    assert not dense_calls
    monkeypatch.setattr(S, "_backend", lambda q: "triton")
    out = S.run_patterns(pats, q, k, v, geometry=geom, layout="blhd", dense=dense)
    assert dense_calls == [(1, geom.seq_len, 1, 64)]  # the Dense head, on the call site's attention
    assert torch.allclose(out, ref, atol=1e-4)
