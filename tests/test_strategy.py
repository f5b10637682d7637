"""In-memory Strategy: sigma buckets, warm-up, dense layers, validation, density over a schedule."""

import math

import pytest

from sparse_vdit.strategies.geometry import VideoGeometry
from sparse_vdit.strategies.patterns import Dense, Diagonal, MultiDiagonal, Skip, VerticalStripe
from sparse_vdit.strategies.strategy import Strategy

A, B, C = Diagonal(0.5), MultiDiagonal(0.2), VerticalStripe()


def two_bucket(**kw):
    # bucket 0: sigma in (0.5, 1.0]; bucket 1: (0.0, 0.5]
    table = (((A, B), (Dense(), Dense())), ((C, Skip()), (A, A)))
    return Strategy(layers=2, heads=2, sigma_edges=(1.0, 0.5, 0.0), patterns=table, **kw)


def test_buckets_follow_sigma_not_step_and_clamp_outside():
    s = two_bucket()
    assert s.buckets == 2
    assert [s.bucket_of(x) for x in (2.0, 1.0, 0.75, 0.5000001, 0.5, 0.2, 0.0, -0.0)] == [0, 0, 0, 0, 1, 1, 1, 1]
    # any schedule maps by noise level: 4 steps or 50 steps give the same bucket per sigma
    for steps in (4, 50):
        sig = [1 - i / steps for i in range(steps)]
        assert all(s.bucket_of(x) == (0 if x > 0.5 else 1) for x in sig)
    assert s.patterns_for(0.9, 0) == (A, B)
    assert s.patterns_for(0.3, 0) == (C, Skip())
    assert s.patterns_for(0.3, 1) == (A, A)


def test_all_dense_layer_warm_up_and_dense_layers_return_none():
    s = two_bucket(dense_above_sigma=0.8, dense_layers={1})
    assert s.patterns_for(0.9, 0) is None          # warm-up
    assert s.patterns_for(0.8, 0) == (A, B)        # at the threshold: sparse
    assert s.patterns_for(0.3, 1) is None          # dense layer
    assert two_bucket().patterns_for(0.9, 1) is None  # every head Dense
    assert s.runs_dense(0.9, 0) and not s.runs_dense(0.3, 0)


def test_uniform_dense_and_with_meta():
    s = Strategy.uniform(A, layers=3, heads=4)
    assert s.patterns_for(123.0, 2) == (A,) * 4 and s.patterns_for(0.0, 0) == (A,) * 4
    d = Strategy.dense(2, 3)
    assert all(d.patterns_for(x, l) is None for x in (5.0, 0.1) for l in range(2))
    m = s.with_meta(model="wan", x=1)
    assert m.meta == {"model": "wan", "x": 1} and s.meta == {}
    assert m == s and m.with_meta(y=2).meta == {"model": "wan", "x": 1, "y": 2}
    assert hash(m) == hash(s)


def test_density_over_a_schedule_counts_dense_steps_and_layers():
    g = VideoGeometry(3, 4, 5, prefix=2)
    s = two_bucket(dense_above_sigma=0.8)
    sigmas = [0.9, 0.7, 0.3]
    dA, dB, dC = A.density(g), B.density(g), C.density(g)
    expected = ((1 + 1)                      # sigma 0.9: warm-up, both layers dense
                + ((dA + dB) / 2 + 1)        # 0.7: layer 0 sparse, layer 1 all Dense
                + ((dC + 0) / 2 + dA)) / 6   # 0.3: stripe + skip; two diagonals
    assert s.density(g, sigmas) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="sigma"):
        s.density(g, [])


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=0), "layers"), (dict(heads=1.5), "heads"),
    (dict(sigma_edges=(1.0,)), "sigma_edges"), (dict(sigma_edges=(0.5, 1.0, 0.0)), "descending"),
    (dict(sigma_edges=(1.0, 0.5, 0.5)), "descending"), (dict(sigma_edges=(1.0, float("nan"), 0.0)), "sigma_edges"),
    (dict(sigma_edges=(1.0, 0.5, -0.1)), "sigma_edges"), (dict(sigma_edges=(2.0, 1.0, 0.5, 0.0)), "3 buckets"),
    (dict(dense_above_sigma=-1.0), "dense_above_sigma"), (dict(dense_above_sigma=math.inf), "dense_above_sigma"),
    (dict(dense_layers={2}), "dense_layers"), (dict(dense_layers={-1}), "dense_layers"),
    (dict(meta=[1]), "meta"),
])
def test_bad_fields_raise_naming_the_problem(kwargs, match):
    base = dict(layers=2, heads=2, sigma_edges=(1.0, 0.5, 0.0),
                patterns=(((A, B), (A, A)), ((C, C), (A, A))))
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Strategy(**base)


@pytest.mark.parametrize("table,match", [
    ((((A, B), (A, A)),), "2 buckets"),
    ((((A, B),), ((C, C), (A, A))), "2 layers"),
    ((((A,), (A, A)), ((C, C), (A, A))), "2 head patterns"),
    ((((A, "dense"), (A, A)), ((C, C), (A, A))), "head 1 is not a Pattern"),
])
def test_bad_tables_raise_naming_where(table, match):
    with pytest.raises(ValueError, match=match):
        Strategy(2, 2, (1.0, 0.5, 0.0), table)


def test_bad_lookups_raise():
    s = two_bucket()
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        s.patterns_for(0.5, 2)
    with pytest.raises(ValueError, match="sigma"):
        s.patterns_for(float("nan"), 0)
    with pytest.raises(ValueError, match="Pattern"):
        Strategy.uniform("dense", 1, 1)
