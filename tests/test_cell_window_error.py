"""bench/cell_window_error.py: cell-window masks and densities vs brute force, density matching, the controller."""

import math
import random

import pytest
import torch

from sparse_vdit.bench.cell_window_error import (TOKEN_CELL, WindowErrors, bracket, cell_window_density,
                                                 cell_window_mask, comparisons, cube_cell_tiles, frame_reach_for,
                                                 interpolate, match_density, measured_windows, padded_cell_tiles,
                                                 results_markdown, spatial_family, tiles_markdown)
from sparse_vdit.kernels.rule import cube_order_map
from sparse_vdit.strategies.geometry import VideoGeometry
from sparse_vdit.strategies.patterns import LocalWindow, pattern_for_density


def _rng():
    seed = random.randrange(2**32)
    return random.Random(seed), seed


def _brute_mask(geom, cell, radii):
    P, W = geom.tokens_per_frame, geom.width
    cells = [(g // P // cell[0], (g % P) // W // cell[1], g % W // cell[2]) for g in range(geom.grid_tokens)]
    return torch.tensor([[all(abs(a[d] - b[d]) <= radii[d] for d in range(3)) for b in cells] for a in cells])


def _random_case(rng):
    geom = VideoGeometry(rng.randint(1, 5), rng.randint(1, 7), rng.randint(1, 7))
    cell = tuple(rng.randint(1, 4) for _ in range(3))
    radii = tuple(rng.randint(0, 3) for _ in range(3))
    return geom, cell, radii


def test_cell_mask_and_density_match_brute_force_including_ragged_cells():
    rng, seed = _rng()
    cases = [(VideoGeometry(5, 7, 6), (2, 3, 4), (0, 1, 0)), (VideoGeometry(3, 5, 5), (2, 2, 3), (1, 0, 1))]
    cases += [_random_case(rng) for _ in range(12)]
    for geom, cell, radii in cases:
        want = _brute_mask(geom, cell, radii)
        assert torch.equal(cell_window_mask(geom, cell, radii), want), (seed, geom, cell, radii)
        rows = sorted(rng.sample(range(geom.grid_tokens), rng.randint(1, geom.grid_tokens)))
        assert torch.equal(cell_window_mask(geom, cell, radii, rows), want[rows]), (seed, geom, cell, radii)
        pairs = cell_window_density(geom, cell, radii) * geom.grid_tokens ** 2
        assert math.isclose(pairs, int(want.sum()), abs_tol=1e-6), (seed, geom, cell, radii)


def test_token_cell_is_the_local_window():
    rng, seed = _rng()
    for _ in range(10):
        geom = VideoGeometry(rng.randint(1, 4), rng.randint(1, 8), rng.randint(1, 8))
        radii = (rng.randint(0, geom.frames), rng.randint(0, geom.height), rng.randint(0, geom.width))
        window = LocalWindow(radii[0], radii[1] / geom.height, radii[2] / geom.width)
        assert window.radii(geom) == radii
        assert torch.equal(cell_window_mask(geom, TOKEN_CELL, radii), window.token_mask(geom)), (seed, geom, radii)
        assert math.isclose(cell_window_density(geom, TOKEN_CELL, radii), window.density(geom)), (seed, geom, radii)


def _mask_density(geom, cell, frame_reach, spatial_reach):
    radii = tuple(math.floor(r / s + 0.5) for r, s in zip((frame_reach, spatial_reach, spatial_reach), cell))
    return int(_brute_mask(geom, cell, radii).sum()) / geom.grid_tokens ** 2, radii


def test_match_density_takes_the_closest_spatial_reach_at_the_first_sufficient_frame_reach():
    rng, seed = _rng()
    for _ in range(15):
        geom = VideoGeometry(rng.randint(1, 3), rng.randint(2, 5), rng.randint(2, 5))
        cell = (rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 3))
        target = rng.uniform(0.02, 0.9)
        side = max(geom.height, geom.width)
        full = [_mask_density(geom, cell, f, side)[0] for f in range(geom.frames)]
        frame = next((f for f, d in enumerate(full) if d >= target), geom.frames - 1)
        assert frame_reach_for(geom, cell, target) == frame, seed
        options = [_mask_density(geom, cell, frame, r) for r in range(side + 1)]
        best = min(abs(d - target) for d, _ in options)
        got = match_density(geom, cell, target)
        assert math.isclose(abs(got.density - target), best, abs_tol=1e-12), (seed, geom, cell, target)
        assert got.radii == next(radii for d, radii in options if math.isclose(abs(d - target), best)), seed


def test_token_window_matches_pattern_for_density_on_square_frames():
    rng, seed = _rng()
    for _ in range(8):
        side = rng.randint(2, 10)
        geom = VideoGeometry(rng.randint(1, 6), side, side)
        target = rng.uniform(0.01, 0.95)
        want = pattern_for_density("local_window", target, geom)
        got = match_density(geom, TOKEN_CELL, target)
        assert math.isclose(abs(got.density - target), abs(want.density(geom) - target)), (seed, geom, target)


def test_bracket_holds_the_nearest_densities_on_each_side():
    rng, seed = _rng()
    for _ in range(20):
        geom, cell, _ = _random_case(rng)
        target = rng.uniform(0.01, 1.0)
        family = [w.density for w in spatial_family(geom, cell, frame_reach_for(geom, cell, target))]
        density = rng.uniform(min(family), max(family))
        lower, upper = bracket(geom, cell, target, density)
        assert lower.density <= density <= upper.density, seed
        assert not any(lower.density < d < upper.density for d in family), seed


def test_interpolate_is_linear_and_clamped():
    a, b = torch.tensor([1.0, 4.0]), torch.tensor([3.0, 0.0])
    assert torch.allclose(interpolate((0.1, a), (0.3, b), 0.15), torch.tensor([1.5, 3.0]))
    assert torch.equal(interpolate((0.1, a), (0.3, b), 0.5), b)
    assert torch.equal(interpolate((0.2, a), (0.2, a), 0.2), a)


def _brute_errors(q, k, v, rows, masks):
    """[windows, heads] squared error sums and the dense reference's squared sums (bhld inputs)."""
    B, h, _, D = q.shape
    err = torch.zeros(len(masks), h, dtype=torch.float64)
    ref_sq = torch.zeros(h, dtype=torch.float64)
    for b in range(B):
        for head in range(h):
            scores = q[b, head, rows].double() @ k[b, head].double().T / math.sqrt(D)
            ref = torch.softmax(scores, -1) @ v[b, head].double()
            ref_sq[head] += ref.pow(2).sum()
            for i, m in enumerate(masks):
                out = torch.softmax(scores.masked_fill(~m, -math.inf), -1) @ v[b, head].double()
                err[i, head] += (out - ref).pow(2).sum()
    return err, ref_sq


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_window_errors_match_masked_softmax_brute_force(layout):
    geom = VideoGeometry(2, 4, 5)
    windows = [match_density(geom, cell, 0.3) for cell in (TOKEN_CELL, (1, 2, 2), (2, 3, 2))]
    recorder = WindowErrors(windows, layers=2, heads=2, steps=3, query_stride=3)
    rows = list(range(0, geom.grid_tokens, 3))
    masks = [cell_window_mask(geom, w.cell, w.radii, rows) for w in windows]
    totals = []
    for step in (0, 2):
        recorder.begin_step(1.0, step)
        q, k, v = (torch.randn(2, 2, geom.grid_tokens, 8) * 2 for _ in range(3))
        args = (q, k, v) if layout == "bhld" else tuple(t.transpose(1, 2) for t in (q, k, v))
        dense_out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        dense_out = dense_out if layout == "bhld" else dense_out.transpose(1, 2)
        out = recorder.attention(*args, layer=1, sigma=1.0, geometry=geom, layout=layout, dense=lambda *a: dense_out)
        assert out is dense_out
        recorder.attention(*args, layer=0, sigma=1.0, geometry=geom, layout=layout, dense=lambda *a: dense_out)
        totals.append(_brute_errors(q, k, v, rows, masks))
    for bucket, (err, ref_sq) in zip((0, 2), totals):
        want = (err / ref_sq).sqrt()
        assert torch.allclose(recorder.head_errors(bucket).view(len(windows), 2, 2)[:, 1], want, rtol=1e-4)
    err = totals[0][0] + totals[1][0]
    want = (err / (totals[0][1] + totals[1][1])).sqrt()
    assert torch.allclose(recorder.head_errors().view(len(windows), 2, 2)[:, 1], want, rtol=1e-4)
    assert recorder.reference_gap < 1e-5


def test_results_markdown_has_a_row_per_window_and_comparison():
    geom = VideoGeometry(3, 4, 4)
    plan = comparisons(geom, cells=((1, 2, 2), (3, 2, 2)), targets=(0.1, 0.4))
    recorder = WindowErrors(measured_windows(plan), layers=1, heads=2, steps=1, query_stride=2)
    q = torch.randn(1, 2, geom.grid_tokens, 4)
    recorder.attention(q, q.flip(2), q, layer=0, sigma=1.0, geometry=geom, layout="bhld",
                       dense=torch.nn.functional.scaled_dot_product_attention)
    text = results_markdown(recorder, plan, geom, command="cmd", settings="s")
    table_rows = [line for line in text.splitlines() if line.startswith("| 0.")]
    nearest = {(c.target, w) for c in plan for w in (c.token, c.nearest)}
    assert len(table_rows) == len(nearest) + 2 * len(plan)
    with pytest.raises(ValueError, match="expected 3"):
        WindowErrors(recorder.windows, 1, 3, 1).attention(q, q, q, layer=0, sigma=1.0, geometry=geom,
                                                          layout="bhld", dense=lambda *a: None)


@pytest.mark.parametrize("block_m, block_n", [(32, 16), (64, 32)])
def test_cube_cell_tiles_match_the_brute_force_tiles_of_the_mask(block_m, block_n):
    # cube-order cubes of 8 x 8 tokens, ragged at the bottom and right (12 x 20 and 11 x 19 frames)
    rng, seed = _rng()
    for geom in (VideoGeometry(2, 12, 20), VideoGeometry(3, 11, 19)):
        radii = (rng.randint(0, 1), rng.randint(0, 1), rng.randint(0, 2))
        order = cube_order_map(geom.frames, geom.height, geom.width)
        mask = cell_window_mask(geom, (1, 8, 8), radii)[order][:, order]  # physical (cube order) rows and columns
        visited = full = 0
        for a in range(0, geom.grid_tokens, block_m):
            for b in range(0, geom.grid_tokens, block_n):
                tile = mask[a:a + block_m, b:b + block_n]
                visited, full = visited + bool(tile.any()), full + bool(tile.all())
        nq, nk = -(-geom.grid_tokens // block_m), -(-geom.grid_tokens // block_n)
        assert cube_cell_tiles(geom, radii, block_m, block_n) == (visited, full, nq * nk), (seed, geom, radii)


def test_tiles_table_has_a_token_and_two_cell_rows_per_shape_and_target():
    shape = (("small", VideoGeometry(4, 16, 24)),)
    rows = [line for line in tiles_markdown(shape, (0.2, 0.5)).splitlines()[2:]]
    assert [r.split(" | ")[2] for r in rows] == ["token", "cell 1x8x8", "cell 1x8x16, padded"] * 2
    for r in rows:
        cells = r.strip("| ").split(" | ")
        assert 0 <= float(cells[6]) <= 1 and 0 < float(cells[7]) <= 1


def test_padded_cell_tiles_match_a_brute_force_padded_layout():
    rng, seed = _rng()
    for geom, cell, block_m, block_n in ((VideoGeometry(2, 6, 10), (1, 4, 4), 16, 8),
                                         (VideoGeometry(3, 7, 9), (1, 2, 8), 16, 4)):
        radii = (rng.randint(0, 1), rng.randint(0, 1), rng.randint(0, 1))
        slots = cell[0] * cell[1] * cell[2]
        cells = {}  # cell coordinate -> its tokens' coordinates; each cell takes `slots` padded positions
        for f in range(geom.frames):
            for y in range(geom.height):
                for x in range(geom.width):
                    cells.setdefault((f // cell[0], y // cell[1], x // cell[2]), []).append(1)
        layout = [c for c in sorted(cells) for i in range(slots)]
        real = [i % slots < len(cells[c]) for i, c in enumerate(layout)]
        n = len(layout)
        mask = torch.tensor([[real[i] and real[j] and all(abs(a - b) <= r for a, b, r in zip(layout[i], layout[j], radii))
                              for j in range(n)] for i in range(n)])
        visited = sum(bool(mask[a:a + block_m, b:b + block_n].any()) for a in range(0, n, block_m)
                      for b in range(0, n, block_n))
        for a in range(0, n, block_m):  # every visited tile is full but for pad keys and rows
            for b in range(0, n, block_n):
                tile, rows, cols = mask[a:a + block_m, b:b + block_n], real[a:a + block_m], real[b:b + block_n]
                if tile.any():
                    assert tile[torch.tensor(rows)][:, torch.tensor(cols)].all(), (seed, geom, radii)
        N = geom.grid_tokens
        want = (visited, -(-N // block_m) * -(-N // block_n))
        assert padded_cell_tiles(geom, cell, radii, block_m, block_n) == want, (seed, geom, cell, radii)
    with pytest.raises(ValueError, match="whole number"):
        padded_cell_tiles(VideoGeometry(2, 6, 10), (1, 4, 4), 32, 8)


@pytest.mark.parametrize("make", ["windows", "stats"])
def test_measuring_controllers_refuse_calls_they_cannot_measure(make):
    from sparse_vdit.testbed.head_stats import HeadStatistics

    geom = VideoGeometry(2, 4, 4)
    controller = (WindowErrors([], layers=2, heads=3, steps=4) if make == "windows"
                  else HeadStatistics(layers=2, heads=3))
    q = torch.randn(1, 3, geom.grid_tokens, 8)

    def call(**over):
        kw = dict(layer=0, sigma=1.0, geometry=geom, layout="bhld", dense=lambda *t: t[0])
        kw.update(over)
        return controller.attention(q, q, q, **kw)

    name = type(controller).__name__
    for over, match in ((dict(layout="lbhd"), "unknown layout 'lbhd'"),
                        (dict(geometry=VideoGeometry(2, 4, 4, prefix=3)), f"{name} handles grid-only"),
                        (dict(layer=2), "layer 2 outside 0..1"),
                        (dict(layout="blhd"), "32 heads, expected 3")):  # [1, 3, 32, 8] read as [B, L, H, D]
        with pytest.raises(ValueError, match=match):
            call(**over)
