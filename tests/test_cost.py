"""The cost model: FLOP-proportional costs off-GPU, the on-disk cache of measured ones, predictions."""

import json
import os

import pytest
import torch

from sparse_vdit.strategies.cost import CostModel, amdahl, cache_dir
from sparse_vdit.strategies.geometry import VideoGeometry
from sparse_vdit.strategies.patterns import Dense, Diagonal, LocalWindow, MultiDiagonal, Skip
from sparse_vdit.strategies.plan import compile_layer
from sparse_vdit.strategies.strategy import Strategy

GEOM = VideoGeometry(5, 12, 14, prefix=3)  # L = 843: several 64-token tiles, ragged tail


def test_flop_costs_are_tile_densities():
    cm = CostModel(GEOM, heads=3, head_dim=64)
    assert not cm.measure and cm.unit == "dense=1"
    assert cm.cost(Skip()) == 0.0 and cm.cost(Dense()) == 1.0
    widths = [Diagonal(0.3), Diagonal(1.0), Diagonal(2.5)]
    costs = [cm.cost(p) for p in widths]
    assert costs == sorted(costs) and costs[0] < costs[-1] < 1.0
    for p in widths + [MultiDiagonal(0.1), LocalWindow(1, 0.3, 0.3)]:
        assert cm.cost(p) == pytest.approx(compile_layer((p,), GEOM, 64, 64, "cpu").tile_density)
        assert cm.cost(p) >= p.density(GEOM) - 1e-9  # tiles cover at least the attended pairs
    assert torch.equal(cm.costs([Dense(), Skip()]), torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_layer_time_and_prediction():
    cm = CostModel(GEOM, heads=3, head_dim=64)
    p = Diagonal(1.0)
    td = cm.cost(p)
    assert cm.dense_layer() == 3.0 and cm.layer_time(None) == 3.0
    assert cm.layer_time((Dense(),) * 3) == 3.0
    assert cm.layer_time((Dense(), p, Skip())) == pytest.approx(1.0 + td)
    sigmas = [0.9, 0.7, 0.5, 0.3]
    uniform = Strategy.uniform(p, layers=2, heads=3)
    assert cm.predict(uniform, sigmas)["attention_speedup"] == pytest.approx(1.0 / td)
    warm = Strategy.uniform(p, layers=2, heads=3, dense_above_sigma=0.6)  # half the steps dense
    assert cm.predict(warm, sigmas)["attention_speedup"] == pytest.approx(2.0 / (1.0 + td))


def test_amdahl():
    assert amdahl(2.0, 1.0) == pytest.approx(2.0)
    assert amdahl(2.0, 0.0) == pytest.approx(1.0)
    assert amdahl(3.0, 0.75) == pytest.approx(1.0 / (0.25 + 0.25))
    with pytest.raises(ValueError, match="attention_share"):
        amdahl(2.0, 1.5)
    with pytest.raises(ValueError, match="attention_speedup"):
        amdahl(0.0, 0.5)


def test_measured_costs_are_cached_per_geometry(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_VDIT_CACHE", str(tmp_path))
    calls = []

    def fake_measure(self, pattern):
        calls.append(pattern)
        return 0.5 + len(calls)

    monkeypatch.setattr(CostModel, "_measure", fake_measure)
    monkeypatch.setattr(CostModel, "_measure_sdpa", lambda self: 7.0)
    cm = CostModel(GEOM, heads=3, head_dim=64, measure=True)
    assert cm.unit == "ms"
    first = cm.cost(Diagonal(1.0))
    assert cm.dense_layer() == 7.0 and cm.cost(Diagonal(1.0)) == first and len(calls) == 1
    files = os.listdir(cache_dir())
    assert len(files) == 1 and json.load(open(os.path.join(cache_dir(), files[0])))["dense_layer"] == 7.0

    monkeypatch.setattr(CostModel, "_measure", lambda self, p: pytest.fail("should come from the cache"))
    again = CostModel(GEOM, heads=3, head_dim=64, measure=True)
    assert again.cost(Diagonal(1.0)) == first and again.dense_layer() == 7.0
    # a mixed layer's dense heads run on SDPA (LayerPlan.run): priced per head of the SDPA layer
    assert again.cost(Dense()) == pytest.approx(7.0 / 3)
    assert again.layer_time((Dense(), Diagonal(1.0), Skip())) == pytest.approx(7.0 / 3 + first)
    other = CostModel(VideoGeometry(5, 12, 15, prefix=3), heads=3, head_dim=64, measure=True)
    with pytest.raises(pytest.fail.Exception):
        other.cost(Diagonal(1.0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="heads"):
        CostModel(GEOM, heads=0, head_dim=64)
