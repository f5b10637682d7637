"""Plan compiler: tile classification vs brute force, dedup pool, order choice, exact outputs."""

import itertools
import random

import numpy as np
import pytest
import torch

from sparse_vdit.kernels.tables import q_tile_bounds
from sparse_vdit.kernels.rule import (CUBE, FRAME_MAJOR, ORDER, ROW_BASE, SKIP_HEAD, SPACE_MAJOR, cube_order_map,
                                     make_rule, physical_to_logical)
from sparse_vdit.strategies.geometry import VideoGeometry
from sparse_vdit.strategies.patterns import (Dense, Diagonal, LocalWindow, MultiDiagonal, Skip, Union,
                                             VerticalStripe, pattern_for_density)
from sparse_vdit.strategies.plan import (_choose_order, _frame_major_window_bound, clear_plans, compile_layer,
                                         full_tiles, pool_bytes, tile_cost, tile_runs, visited_tiles)

GEOMS = [VideoGeometry(3, 5, 7, prefix=2, suffix=3), VideoGeometry(4, 3, 5), VideoGeometry(2, 7, 3, prefix=5),
         VideoGeometry(5, 1, 1, prefix=1), VideoGeometry(3, 4, 9, suffix=20), VideoGeometry(7, 4, 4, prefix=3),
         VideoGeometry(2, 3, 4, prefix=100, suffix=30)]  # a prefix longer than the grid

PATTERNS = [Dense(), Diagonal(0.0), Diagonal(0.6), Diagonal(1.7), MultiDiagonal(0.15), MultiDiagonal(0.3, 1),
            MultiDiagonal(0.0, 0), MultiDiagonal(1.0, 2), LocalWindow(1, 0.3, 0.2), LocalWindow(0, 0.0, 0.5),
            LocalWindow(2, 1.0, 1.0), LocalWindow(1, 1.0, 0.3), VerticalStripe(),
            VerticalStripe(0.5, ((0.3, 0.4), (0.7, 0.75))), Union(Diagonal(0.3), VerticalStripe(1.0)),
            Union(MultiDiagonal(0.1, 1), LocalWindow(0, 0.2, 0.2), VerticalStripe(0.2, ((0.9, 1.0),))),
            Union(MultiDiagonal(0.3), VerticalStripe(0.0, ((0.4, 0.5),))),
            Union(LocalWindow(1, 0.25, 0.3), VerticalStripe(0.3, ((0.6, 0.7),)))]

TILES = [(16, 16), (32, 16), (16, 32)]


def physical_mask(pattern, order, g):
    """The pattern's own token mask with rows and keys in the head's physical order."""
    logical = physical_to_logical(torch.arange(g.seq_len), order, g.prefix, g.frames, g.height, g.width)
    return pattern.token_mask(g)[logical][:, logical].numpy()


def brute_tiles(mask, g, bm, bn, segment=True):
    """(visited, full) per (q-tile, k-tile) from a physical mask; q-tiles as tables.q_tile_bounds."""
    L = mask.shape[0]
    bounds = q_tile_bounds(g.prefix, g.grid_tokens, L, bm, segment)
    nq, nk = len(bounds) - 1, -(-L // bn)
    any_t, all_t = np.zeros((nq, nk), bool), np.zeros((nq, nk), bool)
    for i in range(nq):
        for j in range(nk):
            block = mask[bounds[i]:bounds[i + 1], j * bn:(j + 1) * bn]
            any_t[i, j], all_t[i, j] = block.any(), block.all()
    return any_t, all_t


def decode(row_ptr, runs, base, nq, nk):
    """Dense (visited, full) tile matrices from range-encoded runs; runs must not overlap."""
    visited, full = np.zeros((nq, nk), bool), np.zeros((nq, nk), bool)
    for t in range(nq):
        for start, end, is_full in runs[row_ptr[base + t]:row_ptr[base + t + 1]]:
            assert 0 <= start < end <= nk and not visited[t, start:end].any()
            visited[t, start:end] = True
            full[t, start:end] = bool(is_full)
    return visited, full


def orders_of(rule):
    """The orders valid for a rule: space-major without diagonal or window, cube order for windows
    (with stripes) only."""
    if rule[2] < 0 and rule[5] < 0:
        return [FRAME_MAJOR, SPACE_MAJOR]
    return [FRAME_MAJOR] + ([CUBE] if rule[2] < 0 and rule[3] < 0 else [])


@pytest.mark.parametrize("geom", GEOMS, ids=str)
def test_tiles_match_brute_force_for_every_pattern_and_order(geom):
    for p in PATTERNS:
        rule = p.head_rule(geom)
        for order in orders_of(rule):
            rule[ORDER] = order
            mask = physical_mask(p, order, geom)
            for (bm, bn), segment in itertools.product(TILES, (True, False)):
                row_ptr, runs = tile_runs(rule, order, geom, bm, bn, segment)
                any_true, all_true = brute_tiles(mask, geom, bm, bn, segment)
                visited, full = decode(row_ptr, runs, 0, *any_true.shape)
                if order == CUBE:  # tiles straddling cubes are not boxes: visited is a superset
                    assert not (any_true & ~visited).any(), (p, order, bm, bn)
                else:
                    assert np.array_equal(visited, any_true), (p, order, bm, bn)
                assert not (full & ~all_true).any(), (p, order, bm, bn)
                if isinstance(p, Dense):
                    assert full.all()


def test_full_tiles_are_found_where_bands_cover_them():
    g = VideoGeometry(6, 8, 8, prefix=16)
    for p, order in ((Diagonal(1.0), FRAME_MAJOR), (MultiDiagonal(0.25), SPACE_MAJOR),
                     (LocalWindow(1, 1.0, 1.0), FRAME_MAJOR), (VerticalStripe(1.0), FRAME_MAJOR)):
        rule = p.head_rule(g)
        rule[ORDER] = order
        row_ptr, runs = tile_runs(rule, order, g, 16, 16)
        _, all_true = brute_tiles(physical_mask(p, order, g), g, 16, 16)
        _, full = decode(row_ptr, runs, 0, *all_true.shape)
        assert full.sum() == all_true.sum(), p  # exact on tile-aligned sizes


@pytest.mark.parametrize("geom,tiles", [(VideoGeometry(3, 8, 16, prefix=64, suffix=16), [(16, 16), (32, 16), (64, 32)]),
                                        (VideoGeometry(2, 16, 16), [(128, 64), (16, 64)])])
def test_cube_order_tiles_are_exact_when_tiles_are_boxes(geom, tiles):
    # H, W multiples of 8 and tiles aligned inside cubes (or whole cubes side by side): every tile's
    # grid tokens form a box, so the box test is exact for windows
    for p in (LocalWindow(1, 0.3, 0.2), LocalWindow(0, 0.0, 0.5), LocalWindow(2, 1.0, 0.6), LocalWindow(1, 0.5, 0.5)):
        rule = p.head_rule(geom)
        rule[ORDER] = CUBE
        mask = physical_mask(p, CUBE, geom)
        for bm, bn in tiles:
            row_ptr, runs = tile_runs(rule, CUBE, geom, bm, bn)
            any_true, all_true = brute_tiles(mask, geom, bm, bn)
            visited, full = decode(row_ptr, runs, 0, *any_true.shape)
            assert np.array_equal(visited, any_true), (p, bm, bn)
            assert np.array_equal(full, all_true), (p, bm, bn)


def test_orders_reject_parts_they_cannot_classify():
    g = GEOMS[0]
    for p in (Diagonal(0.5), LocalWindow(1, 0.2, 0.2)):
        with pytest.raises(ValueError, match="space-major"):
            tile_runs(p.head_rule(g), SPACE_MAJOR, g, 16, 16)
    for p in (Diagonal(0.5), Union(MultiDiagonal(0.1), LocalWindow(0, 0.2, 0.2)), VerticalStripe()):
        with pytest.raises(ValueError, match="cube order"):
            tile_runs(p.head_rule(g), CUBE, g, 16, 16)


def test_window_order_is_the_cheaper_though_frame_major_is_compiled_only_when_its_bound_allows():
    # a window is compiled frame-major only when a lower bound of that cost reaches the cube-order
    # cost; the bound never exceeds the real cost, so the choice is the one comparing both orders
    rng = random.Random(3)
    geoms = GEOMS + [VideoGeometry(5, 30, 40), VideoGeometry(3, 24, 33, prefix=40, suffix=70)]
    skipped = compiled = 0
    for _ in range(150):
        g = rng.choice(geoms)
        bm, bn = rng.choice(TILES + [(64, 64), (128, 64)])
        rule = make_rule(win=(rng.randint(0, g.frames), rng.randint(0, g.height), rng.randint(0, g.width)),
                         stripe=rng.choice([0, 0, 0, rng.randint(1, g.grid_tokens)]))
        fm, cube = (tile_cost(tile_runs(rule, order, g, bm, bn)[1]) for order in (FRAME_MAJOR, CUBE))
        bound = _frame_major_window_bound(rule, g, bm, bn)
        assert bound <= fm, (g, bm, bn, rule)
        order, row_ptr, runs, visited, cost = _choose_order(rule, g, bm, bn)
        assert order == (CUBE if cube < fm else FRAME_MAJOR), (g, bm, bn, rule)
        assert (visited, cost) == (visited_tiles(runs), tile_cost(runs))
        skipped, compiled = skipped + (cube < bound), compiled + (cube >= bound)
    assert skipped > 5 and compiled > 5  # both branches exercised


def test_compiled_layer_tables_order_choice_and_dedup():
    clear_plans()
    g = VideoGeometry(6, 5, 6, prefix=3, suffix=5)
    heads = (MultiDiagonal(0.1), Diagonal(0.5), Skip(), Diagonal(0.5), Union(MultiDiagonal(0.1), VerticalStripe()),
             Dense())
    plan = compile_layer(heads, g, 16, 32)
    tables = plan.tables
    tables.validate(check_contents=True)
    rules = tables.head_rules.tolist()
    row_ptr, runs = tables.row_ptr.numpy(), tables.runs.numpy()
    nq, nk = tables.num_q_tiles, tables.num_k_tiles
    visited_total = 0
    for p, r in zip(heads, rules):
        if isinstance(p, Skip):
            assert r[ORDER] == SKIP_HEAD
            continue
        any_true, all_true = brute_tiles(physical_mask(p, r[ORDER], g), g, 16, 32)
        visited, full = decode(row_ptr, runs, r[ROW_BASE], nq, nk)
        assert np.array_equal(visited, any_true) and not (full & ~all_true).any()
        visited_total += visited.sum()
        if isinstance(p, MultiDiagonal):  # the order that visits fewer tiles
            other = brute_tiles(physical_mask(p, 1 - r[ORDER], g), g, 16, 32)[0].sum()
            assert visited.sum() <= other
    assert rules[0][ORDER] == SPACE_MAJOR  # an all-frame spatial band fills tiles in space-major order
    assert rules[4][ORDER] == FRAME_MAJOR  # stripes would scatter in space-major order
    assert rules[1] == rules[3]            # same pattern, same rows
    assert plan.tile_density == pytest.approx(visited_total / (5 * nq * nk))
    assert plan.densities == tuple(p.density(g) for p in heads)

    # a second layer reuses the pool rows of known rules; compiling again hits the cache
    before = pool_bytes()
    plan2 = compile_layer((Diagonal(0.5), Dense(), Diagonal(0.5)), g, 16, 32)
    assert pool_bytes() == before
    assert plan2.tables.head_rules[0].tolist() == rules[1]
    assert compile_layer(list(heads), g, 16, 32) is plan
    plan3 = compile_layer((Diagonal(0.25),), g, 16, 32)
    assert pool_bytes() > before
    assert plan3.tables.runs.shape[0] > tables.runs.shape[0]
    plan.tables.validate(check_contents=True)  # older plans see the grown pool
    clear_plans()
    assert pool_bytes() == 0


def test_threaded_classification_lays_out_the_pool_as_one_thread_does(monkeypatch):
    # a layer's new rules are classified in threads; the pool must not depend on which finishes first
    from sparse_vdit.strategies import plan as PL

    g = VideoGeometry(5, 9, 11, prefix=4)
    heads = (LocalWindow(1, 0.4, 0.3), Diagonal(0.3), MultiDiagonal(0.2), LocalWindow(2, 0.2, 0.5),
             VerticalStripe(), Skip(), Diagonal(0.3), LocalWindow(0, 0.3, 0.3), Dense())
    layouts = []
    for threads in (1, 4):
        monkeypatch.setattr(PL, "_CLASSIFY_THREADS", threads)
        clear_plans()
        tables = compile_layer(heads, g, 16, 16).tables
        tables.validate(check_contents=True)
        layouts.append((tables.head_rules.tolist(), tables.row_ptr.tolist(), tables.runs.tolist()))
    assert layouts[0] == layouts[1]
    assert len({r[ROW_BASE] for r in layouts[0][0] if r[ORDER] != SKIP_HEAD}) == 7  # distinct patterns
    clear_plans()


def test_dense_heads_split_off_leave_the_masked_share_of_the_heads_that_launch():
    # a mixed layer's dense heads go to SDPA (LayerPlan.run): the kernel choice (KernelTables.masked_percent,
    # kernels._gluon_mode) must see the window head's masked tiles undiluted by them
    g = VideoGeometry(21, 30, 52)
    window = pattern_for_density("local_window", 0.1, g)
    plan = compile_layer((Dense(), window, Dense(), Dense()), g, 128, 64)
    split, index = plan._dense_split()
    alone = compile_layer((window,), g, 128, 64)
    assert index.tolist() == [0, 2, 3]
    assert split.masked_percent == alone.tables.masked_percent > 25 > plan.tables.masked_percent
    assert plan.masked_share([1]) == pytest.approx(alone.masked_share())


def test_all_skip_layer_has_zero_tile_density():
    plan = compile_layer((Skip(), Skip()), GEOMS[1], 16, 16)
    assert plan.tile_density == 0.0 and plan.masked_share() == 0.0 and plan.tables.masked_percent == 0
    plan.tables.validate(check_contents=True)


@pytest.mark.parametrize("bad,match", [
    (lambda g: compile_layer((), g, 16, 16), "at least one"),
    (lambda g: compile_layer((Dense(), "skip"), g, 16, 16), "head 1"),
    (lambda g: compile_layer((Dense(),), (2, 3, 4), 16, 16), "VideoGeometry"),
    (lambda g: compile_layer((Dense(),), g, 24, 16), "block_m"),
    (lambda g: compile_layer((Dense(),), g, 16, 8), "block_n"),
])
def test_bad_compile_input_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        bad(GEOMS[0])


def oracle(q, k, v, heads, g, kv_len, layout):
    """float64 masked softmax from each pattern's own token mask; skip heads and keyless rows give 0."""
    qb, kb, vb = ((t if layout == "bhld" else t.transpose(1, 2)).double() for t in (q, k, v))
    B, H, L, D = qb.shape
    out = torch.zeros(B, H, L, D, dtype=torch.float64)
    keys = torch.arange(L)
    for h, p in enumerate(heads):
        mask = p.token_mask(g)
        for b in range(B):
            m = mask & (keys < (L if kv_len is None else int(kv_len[b])))[None, :]
            s = (qb[b, h] @ kb[b, h].T) * D ** -0.5
            prob = torch.softmax(s.masked_fill(~m, float("-inf")), dim=-1).nan_to_num(0.0)
            out[b, h] = prob @ vb[b, h]
    return out if layout == "bhld" else out.transpose(1, 2)


def random_case(seed, max_len):
    rng = random.Random(seed)
    while True:
        g = VideoGeometry(rng.randint(1, 4), rng.randint(1, 6), rng.randint(1, 7),
                          prefix=rng.choice([0, 0, 3, 11]), suffix=rng.choice([0, 0, 5, 17]))
        if 16 <= g.seq_len <= max_len:
            break
    heads = tuple(rng.choice(PATTERNS + [Skip()]) for _ in range(rng.randint(2, 4)))
    return rng, g, heads


@pytest.mark.parametrize("seed", range(6))
def test_reference_backend_matches_float64_oracle(seed):
    rng, g, heads = random_case(seed, 200)
    layout, D, B = rng.choice(["bhld", "blhd"]), rng.choice([64, 128]), rng.randint(1, 2)
    torch.manual_seed(seed)
    shape = (B, len(heads), g.seq_len, D) if layout == "bhld" else (B, g.seq_len, len(heads), D)
    q, k, v = (torch.randn(shape) for _ in range(3))
    kv_len = torch.tensor([rng.randint(1, g.seq_len) for _ in range(B)], dtype=torch.int32) if seed % 2 else None
    plan = compile_layer(heads, g, 16, 16)
    out = plan.run(q, k, v, layout=layout, kv_len=kv_len, backend="reference")
    expected = oracle(q, k, v, heads, g, kv_len, layout)
    assert out.shape == q.shape
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed,layout,D,geom", [(11, "bhld", 64, VideoGeometry(5, 4, 5, suffix=7)),
                                                 (12, "blhd", 128, VideoGeometry(5, 5, 3, prefix=7, suffix=2))])
def test_triton_backend_on_plan_tables_matches_float64_oracle(seed, layout, D, geom):
    pytest.importorskip("triton")
    rng = random.Random(seed)
    # random heads plus a space-major spatial band and a skip head in every launch
    heads = tuple(rng.choice(PATTERNS) for _ in range(2)) + (MultiDiagonal(0.3), Skip())
    B = 2
    torch.manual_seed(seed)
    shape = (B, len(heads), geom.seq_len, D) if layout == "bhld" else (B, geom.seq_len, len(heads), D)
    q, k, v = (torch.randn(shape) for _ in range(3))
    kv_len = torch.tensor([geom.seq_len, rng.randint(1, geom.seq_len)], dtype=torch.int32)
    plan = compile_layer(heads, geom, 16, 16)
    assert plan.tables.head_rules[2, ORDER] == SPACE_MAJOR
    out = plan.run(q, k, v, layout=layout, kv_len=kv_len, backend="triton")
    expected = oracle(q, k, v, heads, geom, kv_len, layout)
    rel = (out.double() - expected).norm() / expected.norm()
    assert rel <= 1e-5
    assert (out[:, 3] if layout == "bhld" else out[:, :, 3]).eq(0).all()


def test_window_heads_get_cube_order_with_fewer_partial_tiles():
    # Wan2.1 480p at the H200 tiles: the plan picks cube order for local windows; the tile counts
    # (full counted 1, partial PARTIAL_TILE_COST) are the CPU proxy for kernel time
    g = VideoGeometry(21, 30, 52)
    for density in (0.1, 0.3):
        p = pattern_for_density("local_window", density, g)
        fm = tile_runs(p.head_rule(g), FRAME_MAJOR, g, 128, 64)[1]
        plan = compile_layer((p, Skip()), g, 128, 64)
        rule = plan.tables.head_rules[0].tolist()
        assert rule[ORDER] == CUBE, density
        nq = plan.tables.num_q_tiles
        runs = plan.tables.runs.numpy()[plan.tables.row_ptr[rule[ROW_BASE]]:plan.tables.row_ptr[rule[ROW_BASE] + nq]]
        assert visited_tiles(runs) - full_tiles(runs) < 0.9 * (visited_tiles(fm) - full_tiles(fm))
        assert full_tiles(runs) > 0.2 * visited_tiles(runs) and full_tiles(fm) == 0
        assert tile_cost(runs) < tile_cost(fm)
        assert plan.cost_density == pytest.approx(tile_cost(runs) / (nq * plan.tables.num_k_tiles))
        assert plan.tile_density == pytest.approx(visited_tiles(runs) / (nq * plan.tables.num_k_tiles))
        masked = 1 - full_tiles(runs) / visited_tiles(runs)  # what picks the kernel (kernels._gluon_mode)
        assert plan.masked_share() == pytest.approx(masked) and plan.tables.masked_percent == round(100 * masked)
        plan.tables.validate()
        assert plan.tables.cube_map.dtype == torch.int32
        assert torch.equal(plan.tables.cube_map.long(), cube_order_map(g.frames, g.height, g.width))


def test_plan_with_cube_heads_matches_float64_oracle():
    pytest.importorskip("triton")
    g = VideoGeometry(1, 10, 37, prefix=3, suffix=2)  # H, W not multiples of 8; tall narrow windows
    heads = (LocalWindow(0, 0.5, 0.1), Skip(), Union(LocalWindow(0, 0.5, 0.1), VerticalStripe(0.1)), Diagonal(0.1))
    plan = compile_layer(heads, g, 32, 16)
    orders = plan.tables.head_rules[:, ORDER].tolist()
    assert orders[0] == CUBE and orders[2] == CUBE and orders[3] == FRAME_MAJOR
    plan.tables.validate(check_contents=True)
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, len(heads), g.seq_len, 64) for _ in range(3))
    kv_len = torch.tensor([150], dtype=torch.int32)
    expected = oracle(q, k, v, heads, g, kv_len, "bhld")
    for backend in ("reference", "triton"):
        out = plan.run(q, k, v, kv_len=kv_len, backend=backend)
        assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5), backend
