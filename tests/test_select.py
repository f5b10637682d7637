"""Selection under a global budget and re-selection from a stored error table."""

import itertools

import pytest
import torch

from sparse_vdit.strategies.file import SearchRecord, load_strategy, save_strategy
from sparse_vdit.strategies.patterns import Dense, Diagonal, LocalWindow, Skip
from sparse_vdit.strategies.select import reselect, select, to_strategy

CANDS = (Dense(), Skip(), Diagonal(0.5), LocalWindow(0, 0.3, 0.3))


def _tables(B=4, L=3, H=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    errors = torch.rand(B, L, H, len(CANDS), generator=gen) * torch.tensor([0.0, 1.0, 0.2, 0.1])
    cost = torch.tensor([1.0, 0.0, 0.3, 0.2])
    return errors, cost, torch.rand(B, generator=gen) + 0.5, torch.ones(B)


def test_budget_met_and_monotone():
    errors, cost, w, n = _tables()
    prev_err = -1.0
    for target in (1.0, 1.5, 2.0, 3.0, 5.0):
        sel = select(CANDS, errors, cost, w, n, 2.0, target_speedup=target, outlier_ratio=1e9)
        assert sel.predicted_speedup >= target * (1 - 1e-9)
        assert sel.predicted_error >= prev_err - 1e-12
        prev_err = sel.predicted_error
    loose = select(CANDS, errors, cost, w, n, 2.0, error_budget=prev_err, outlier_ratio=1e9)
    assert loose.predicted_error <= prev_err * (1 + 1e-9)
    tight = select(CANDS, errors, cost, w, n, 2.0, error_budget=0.0, outlier_ratio=1e9)
    assert tight.predicted_error == 0.0 and tight.predicted_speedup == pytest.approx(1.0)


def test_lagrangian_choice_is_optimal_for_its_time():
    """No assignment with the same or less time has less error (brute force over 3^4 choices)."""
    errors, cost, w, n = _tables(B=1, L=2, H=2, seed=4)
    errors, cost = errors[..., [0, 2, 3]], cost[[0, 2, 3]]
    cands = (CANDS[0], CANDS[2], CANDS[3])
    dense_layer = 2.0  # = heads * dense cost: the time model is separable
    for target in (1.2, 1.6, 2.2):
        sel = select(cands, errors, cost, w, n, dense_layer, target_speedup=target, outlier_ratio=1e9)
        for combo in itertools.product(range(3), repeat=4):
            c = torch.tensor(combo).view(1, 2, 2)
            t = float(cost[c].sum())
            e = float((torch.gather(errors.double(), -1, c.unsqueeze(-1)).squeeze(-1) * w.double().view(1, 1, 1)).sum())
            if t <= sel.predicted_time + 1e-9:
                assert e >= sel.predicted_error - 1e-9, (combo, t, e, sel)


def test_warmup_and_dense_layers_decided():
    errors, cost, w, n = _tables(B=6, L=4, H=2, seed=1)
    errors[0] *= 50.0          # the first bucket errs far more than the rest: warm-up
    errors[1:, 2] *= 40.0      # layer 2 errs far more than the others: dense layer
    sel = select(CANDS, errors, cost, w, n, 2.0, target_speedup=1.3)
    assert sel.warmup_buckets == 1 and 2 in sel.dense_layers
    assert (sel.choice[0] == 0).all() and (sel.choice[:, 2] == 0).all()
    assert sel.predicted_speedup >= 1.3 * (1 - 1e-9)
    s = to_strategy(sel, CANDS, (2.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.0))
    assert s.dense_above_sigma == 0.9 and 2 in s.dense_layers
    # forcing is dropped when the budget cannot be met with it
    fast = select(CANDS, errors, cost, w, n, 2.0, target_speedup=8.0)
    assert fast.warmup_buckets == 0 and fast.predicted_speedup >= 8.0 * (1 - 1e-9)


def test_bad_arguments():
    errors, cost, w, n = _tables()
    with pytest.raises(ValueError, match="exactly one budget"):
        select(CANDS, errors, cost, w, n, 2.0)
    with pytest.raises(ValueError, match="target_speedup"):
        select(CANDS, errors, cost, w, n, 2.0, target_speedup=0.5)
    with pytest.raises(ValueError, match="no Dense"):
        select(CANDS[1:], errors[..., 1:], cost[1:], w, n, 2.0, target_speedup=2.0)
    with pytest.raises(ValueError, match="cost has shape"):
        select(CANDS, errors, cost[:2], w, n, 2.0, target_speedup=2.0)
    with pytest.raises(ValueError, match="step_weights"):
        select(CANDS, errors, cost, w[:2], n, 2.0, target_speedup=2.0)


def _searched(tmp_path, target=2.0):
    errors, cost, w, n = _tables(B=5, L=3, H=4, seed=2)
    record = SearchRecord(CANDS, errors, cost, w, n, 4.0)
    sel = select(CANDS, errors, cost, w, n, 4.0, target_speedup=target)
    s = to_strategy(sel, CANDS, (2.0, 0.9, 0.7, 0.5, 0.3, 0.0),
                    {"record": record, "search": {"target_speedup": target, "outlier_ratio": 3.0, "max_warmup": 0.5}})
    path = tmp_path / "s.safetensors"
    save_strategy(s, path)
    return s, load_strategy(path)


def test_reselect_at_searched_budget_reproduces(tmp_path):
    s, loaded = _searched(tmp_path)
    again = reselect(loaded, target_speedup=2.0)
    assert again.patterns == s.patterns
    assert again.dense_above_sigma == s.dense_above_sigma and again.dense_layers == s.dense_layers


def test_reselect_new_budget_and_other_costs(tmp_path):
    _, loaded = _searched(tmp_path)
    faster = reselect(loaded, target_speedup=4.0)
    assert faster.meta["search"]["predicted_speedup"] >= 4.0 * (1 - 1e-9)
    # a GPU where local windows are expensive: none is chosen any more
    pricey = reselect(loaded, target_speedup=2.0, cost=torch.tensor([1.0, 0.0, 0.3, 5.0]))
    assert not any(isinstance(p, LocalWindow) for b in pricey.patterns for l in b for p in l)
    assert torch.equal(pricey.meta["record"].cost, torch.tensor([1.0, 0.0, 0.3, 5.0]))
    hand = to_strategy(select(CANDS, *_tables(), 2.0, target_speedup=2.0), CANDS, (2.0, 0.9, 0.7, 0.5, 0.0))
    with pytest.raises(ValueError, match="no stored error table"):
        reselect(hand, target_speedup=2.0)


def test_predicted_error_of_reselected_strategy_matches_measured():
    """On a tiny Wan: search at one budget, re-select at another, run it: the predicted weighted
    error is within 20% of the one measured at the call sites during the run."""
    from diffusers import WanTransformer3DModel

    from sparse_vdit.adapters.loading import shipped_config
    from sparse_vdit.cli import wan_runner
    from sparse_vdit.strategies.search import SearchSettings, measure_strategy, search

    torch.manual_seed(0)
    model = WanTransformer3DModel.from_config(shipped_config("wan-tiny")).eval()
    gen = torch.Generator().manual_seed(1)
    prompt, negative = torch.randn(1, 7, 32, generator=gen), torch.randn(1, 7, 32, generator=gen)
    run, sigmas = wan_runner(model, (1, 4, 4, 8, 10), prompt, negative, steps=4, guidance=5.0, shift=3.0, seed=0)
    settings = SearchSettings(target_speedup=2.0, densities=(0.1, 0.25, 0.5), rows=48, max_warmup=0.0)
    with torch.no_grad():
        res = search(run, sigmas=sigmas, layers=2, settings=settings)
        other = reselect(res.strategy, target_speedup=1.5)
        measured = measure_strategy(run, other, res.record, sigmas=sigmas, layers=2, settings=settings)
    predicted = other.meta["search"]["predicted_error"]
    assert predicted > 0
    assert abs(predicted - measured["measured_error"]) <= 0.2 * measured["measured_error"], (predicted, measured)
