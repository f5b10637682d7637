"""Pattern vocabulary: exact masks vs the kernel rule, densities, unions, files, validation."""

import json
import random

import pytest
import torch

from sparse_vdit.kernels.rule import rule_mask
from sparse_vdit.strategies import patterns as pat
from sparse_vdit.strategies.geometry import VideoGeometry
from sparse_vdit.strategies.patterns import (Dense, Diagonal, LocalWindow, MultiDiagonal, Skip, Union,
                                             VerticalStripe, pattern_for_density, pattern_from_dict)

GEOMS = [VideoGeometry(3, 5, 7, prefix=2, suffix=3), VideoGeometry(4, 3, 5),
         VideoGeometry(2, 7, 3, prefix=5), VideoGeometry(1, 4, 9, suffix=4), VideoGeometry(5, 1, 1, prefix=1)]

PATTERNS = [Dense(), Skip(), Diagonal(0.0), Diagonal(0.6), Diagonal(2.3), MultiDiagonal(0.15),
            MultiDiagonal(0.3, frames=1), MultiDiagonal(0.0, frames=0), LocalWindow(1, 0.3, 0.2),
            LocalWindow(0, 0.0, 0.5), VerticalStripe(), VerticalStripe(0.5, ((0.3, 0.4), (0.8, 0.85))),
            VerticalStripe(0.0, ((0.1, 0.2),)),
            Union(Diagonal(0.3), VerticalStripe(1.0)),
            Union(MultiDiagonal(0.1, 1), LocalWindow(0, 0.2, 0.2), VerticalStripe(0.2, ((0.9, 1.0),))),
            Union(Diagonal(0.5), MultiDiagonal(0.2), LocalWindow(1, 0.4, 0.1))]


def random_pattern(rng: random.Random):
    kinds = [lambda: Diagonal(rng.uniform(0, 1.5)),
             lambda: MultiDiagonal(rng.uniform(0, 0.5), rng.choice([None, 0, 1, 2])),
             lambda: LocalWindow(rng.randint(0, 2), rng.uniform(0, 0.6), rng.uniform(0, 0.6)),
             lambda: VerticalStripe(rng.uniform(0, 1.2), ((rng.uniform(0, 0.4), rng.uniform(0.5, 1.0)),))]
    return Union(*(k() for k in rng.sample(kinds, rng.randint(1, 4))))


def logical(geom):
    return torch.arange(geom.seq_len)


def kernel_rule_mask(p, g):
    return rule_mask(p.head_rule(g), g.prefix, g.frames, g.height, g.width, logical(g), logical(g))


@pytest.mark.parametrize("geom", GEOMS, ids=str)
def test_token_mask_matches_the_kernel_rule_and_its_density(geom):
    rng = random.Random(hash(geom) % 1000)
    for p in PATTERNS + [random_pattern(rng) for _ in range(8)]:
        m = p.token_mask(geom)
        assert m.shape == (geom.seq_len, geom.seq_len) and m.dtype == torch.bool
        assert torch.equal(m, kernel_rule_mask(p, geom)), p
        assert p.density(geom) == pytest.approx(m.double().mean().item(), abs=1e-12), p


def test_shared_rules_non_grid_rows_columns_and_self():
    g = VideoGeometry(3, 4, 5, prefix=3, suffix=2)
    grid = slice(g.prefix, g.prefix + g.grid_tokens)
    for p in PATTERNS:
        m = p.token_mask(g)
        if isinstance(p, Skip):
            assert not m.any()
            continue
        assert m[: g.prefix].all() and m[-g.suffix:].all()
        assert m[:, : g.prefix].all() and m[:, -g.suffix:].all()
        assert m.diagonal().all()
        assert m[grid, grid].any(dim=1).all()


def test_grid_rules_by_coordinates():
    g = VideoGeometry(4, 5, 6, prefix=1)
    P, W = 30, 6

    def tok(f, y, x):
        return g.prefix + f * P + y * W + x

    m = Diagonal(0.5).token_mask(g)  # radius 15 tokens
    assert m[tok(1, 0, 0), tok(1, 0, 0) + 15] and not m[tok(1, 0, 0), tok(1, 0, 0) + 16]
    m = MultiDiagonal(0.1, frames=1).token_mask(g)  # |ds| <= 3, |df| <= 1
    assert m[tok(1, 2, 2), tok(2, 2, 5)] and not m[tok(1, 2, 2), tok(3, 2, 2)]
    assert not m[tok(1, 2, 2), tok(2, 3, 0)]  # ds = 4
    m = LocalWindow(1, 0.2, 0.34).token_mask(g)  # |df|<=1, |dy|<=1, |dx|<=2
    assert m[tok(1, 2, 2), tok(0, 3, 4)] and not m[tok(1, 2, 2), tok(0, 4, 2)]
    assert not m[tok(1, 2, 2), tok(1, 2, 5)]
    m = VerticalStripe(0.5, ((0.5, 0.6),)).token_mask(g)  # g < 15, 60 <= g < 72
    assert m[tok(3, 4, 5), tok(0, 2, 2)] and not m[tok(3, 4, 5), tok(0, 2, 3)]
    assert m[tok(0, 0, 0), g.prefix + 71] and not m[tok(0, 0, 0), g.prefix + 72]


def test_token_mask_rows_select_rows_and_reject_out_of_range():
    g = GEOMS[0]
    p = PATTERNS[-1]
    rows = torch.tensor([0, 7, g.seq_len - 1, 7])
    assert torch.equal(p.token_mask(g, rows), p.token_mask(g)[rows])
    with pytest.raises(ValueError, match="rows"):
        p.token_mask(g, [g.seq_len])
    with pytest.raises(ValueError, match="rows"):
        p.token_mask(g, [-1])


def test_union_density_row_sample_is_close(monkeypatch):
    g = VideoGeometry(5, 9, 11, prefix=3, suffix=4)
    p = Union(Diagonal(0.4), MultiDiagonal(0.1, 2), VerticalStripe(0.3))
    exact = p.token_mask(g).double().mean().item()
    assert p.density(g) == pytest.approx(exact, abs=1e-12)
    monkeypatch.setattr(pat, "DENSITY_BUDGET", 2000)
    assert p.density(g) == pytest.approx(exact, rel=0.03)


def test_head_rule_clamps_so_equal_masks_share_rules():
    g = VideoGeometry(2, 3, 4)
    assert Diagonal(50.0).head_rule(g) == Dense().head_rule(g)
    assert MultiDiagonal(1.0, 10).head_rule(g) == MultiDiagonal(1.0).head_rule(g)
    assert Skip().head_rule(g)[0] == -1
    assert all(r[0] == 0 and r[1] == 0 for r in (p.head_rule(g) for p in PATTERNS if p != Skip()))


def test_union_normalises_merges_and_rejects_impossible_boxes():
    assert Union(Diagonal(0.2), Diagonal(0.7)) == Union(Diagonal(0.7))
    assert Union(VerticalStripe(), Diagonal(0.2)) == Union(Diagonal(0.2), VerticalStripe())
    assert hash(Union(VerticalStripe(), Diagonal(0.2))) == hash(Union(Diagonal(0.2), VerticalStripe()))
    assert Union(Skip(), Diagonal(0.2)).parts == (Diagonal(0.2),)
    assert Union(Dense(), Diagonal(0.2)).parts == (Dense(),)
    assert Union(Union(Diagonal(0.1), MultiDiagonal(0.1)), Diagonal(0.3)).parts == (Diagonal(0.3), MultiDiagonal(0.1))
    assert Union(MultiDiagonal(0.2), MultiDiagonal(0.1, 2)).parts == (MultiDiagonal(0.2),)
    assert Union(LocalWindow(1, 0.2, 0.2), LocalWindow(2, 0.3, 0.2)).parts == (LocalWindow(2, 0.3, 0.2),)
    merged = Union(VerticalStripe(0.5, ((0.1, 0.2),)), VerticalStripe(1.0, ((0.15, 0.3), (0.5, 0.6))))
    assert merged.parts == (VerticalStripe(1.0, ((0.1, 0.3), (0.5, 0.6))),)
    with pytest.raises(ValueError, match="LocalWindow"):
        Union(LocalWindow(1, 0.2, 0.2), LocalWindow(0, 0.5, 0.2))
    with pytest.raises(ValueError, match="MultiDiagonal"):
        Union(MultiDiagonal(0.3, 1), MultiDiagonal(0.1))
    with pytest.raises(ValueError, match="at most 3"):
        Union(VerticalStripe(1.0, ((0.1, 0.2), (0.3, 0.4))), VerticalStripe(1.0, ((0.5, 0.6), (0.7, 0.8))))
    with pytest.raises(ValueError, match="Skip"):
        Union(Skip())
    with pytest.raises(ValueError, match="patterns"):
        Union(Diagonal(0.1), "dense")


def test_union_mask_is_or_of_parts():
    g = GEOMS[0]
    parts = (Diagonal(0.2), MultiDiagonal(0.1, 1), VerticalStripe(0.3))
    expected = parts[0].token_mask(g) | parts[1].token_mask(g) | parts[2].token_mask(g)
    assert torch.equal(Union(*parts).token_mask(g), expected)


@pytest.mark.parametrize("bad,field", [
    (lambda: Diagonal(-0.1), "width"), (lambda: Diagonal(float("nan")), "width"),
    (lambda: Diagonal("1"), "width"), (lambda: MultiDiagonal(1.5), "spatial"),
    (lambda: MultiDiagonal(0.1, -1), "frames"), (lambda: MultiDiagonal(0.1, 1.5), "frames"),
    (lambda: LocalWindow(-1, 0.1, 0.1), "frames"), (lambda: LocalWindow(1, 2.0, 0.1), "height"),
    (lambda: LocalWindow(1, 0.1, -0.1), "width"), (lambda: VerticalStripe(-1.0), "first_frames"),
    (lambda: VerticalStripe(1.0, ((0.5, 0.4),)), "columns"), (lambda: VerticalStripe(1.0, ((0.1,),)), "columns"),
    (lambda: VerticalStripe(1.0, ((0.1, 1.2),)), "columns"), (lambda: VerticalStripe(1.0, 5), "columns"),
    (lambda: VerticalStripe(1.0, ((0.0, 0.1), (0.2, 0.3), (0.4, 0.5), (0.6, 0.7))), "columns"),
])
def test_bad_parameters_raise_naming_pattern_and_field(bad, field):
    with pytest.raises(ValueError, match=field):
        bad()


def test_dict_round_trip_is_json_safe():
    rng = random.Random(3)
    for p in PATTERNS + [random_pattern(rng) for _ in range(10)]:
        d = json.loads(json.dumps(p.to_dict()))
        assert pattern_from_dict(d) == p
        assert isinstance(p.label, str) and p.label
    for bad in [{"name": "nope"}, {}, "dense", {"name": "diagonal"}, {"name": "diagonal", "width": 1, "x": 2},
                {"name": "union", "parts": "x"}, {"name": "diagonal", "width": -1}]:
        with pytest.raises(ValueError):
            pattern_from_dict(bad)


@pytest.mark.parametrize("family", pat.FAMILIES)
@pytest.mark.parametrize("target", [0.1, 0.3])
def test_pattern_for_density_is_the_closest_of_its_family(family, target):
    g = VideoGeometry(4, 6, 9, prefix=2, suffix=3)
    p = pattern_for_density(family, target, g)
    assert p.name == family
    err = abs(p.density(g) - target)
    # no neighbour of the chosen knob is closer
    P, side = g.tokens_per_frame, 9
    if family == "diagonal":
        near = [Diagonal(max(0, p.radius(g) + d) / P) for d in (-1, 1)]
    elif family == "multi_diagonal":
        near = [MultiDiagonal(min(P, max(0, p.radii(g)[0] + d)) / P) for d in (-1, 1)]
    elif family == "vertical_stripe":
        n = round(p.first_frames * P)
        near = [VerticalStripe(max(0, n + d) / P) for d in (-1, 1)]
    else:
        k = round(p.width * side)
        near = [LocalWindow(p.frames, min(side, max(0, k + d)) / side, min(side, max(0, k + d)) / side)
                for d in (-1, 1)]
    assert all(err <= abs(q.density(g) - target) + 1e-12 for q in near)
    assert err < 0.05


def test_pattern_for_density_rejects_bad_requests():
    g = GEOMS[0]
    with pytest.raises(ValueError, match="family"):
        pattern_for_density("spiral", 0.2, g)
    with pytest.raises(ValueError, match="density"):
        pattern_for_density("diagonal", 1.5, g)
