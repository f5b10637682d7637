"""bench/tile_cost_fit.py: the fit recovers known costs from benchmark rows in either file format, and
the probe's synthetic tables visit exactly their first k-tiles, full or masked alike."""

import json
import random

import pytest
import torch

from sparse_vdit.bench import tile_cost_fit as T
from sparse_vdit.kernels import sparse_attention
from sparse_vdit.strategies.geometry import VideoGeometry


def _rows(a, b, e, rng):
    """Rows of the CogVideoX1.5 shape whose times follow the model exactly."""
    _, dense_full, dense_masked = T.layer_counts("cogvideox")
    rows = [dict(shape="CogVideoX1.5 768p", variant="ours dense 128x64", ms=a * dense_full + b * dense_masked + e,
                 token_density=1.0, note="")]
    for name, density in (("diagonal 0.1", 0.1), ("diagonal 0.3", 0.3), ("vertical_stripe 0.1", 0.1)):
        full, masked = rng.randint(10**5, 10**6), rng.randint(10**4, 10**5)
        rows.append(dict(shape="CogVideoX1.5 768p", variant=f"{name} 128x64", ms=a * full + b * masked + e,
                         token_density=density, note=f"plan 1 ms; fm x48; {full} full, {masked} partial; 8x3 TMA"))
        # a bracketed row of another kernel (counts from the row above), twice as slow
        rows.append(dict(shape="CogVideoX1.5 768p", variant=f"{name} 128x64 [triton]", ms=2 * rows[-1]["ms"],
                         token_density=density, note="8x3 TMA"))
    rows.append(dict(shape="CogVideoX1.5 768p", variant="ours dense 128x64 [triton]", ms=2 * rows[0]["ms"],
                     token_density=1.0, note="4x3 TMA"))
    # space-major heads also copy K/V, which the model leaves out: not fitted
    rows.append(dict(shape="CogVideoX1.5 768p", variant="multi_diagonal 0.1 128x64", ms=1.0, token_density=0.1,
                     note="plan 1 ms; sm x48; 1152912 full, 109488 partial; 8x3 TMA"))
    return rows


@pytest.mark.parametrize("fmt", ["json", "markdown"])
def test_fit_recovers_the_costs_the_rows_were_made_with(fmt, tmp_path):
    rng = random.Random()
    a, b, e = rng.uniform(3e-6, 6e-6), rng.uniform(6e-6, 2e-5), rng.uniform(0.05, 0.5)
    rows = _rows(a, b, e, rng)
    path = tmp_path / "rows"
    if fmt == "json":
        path.write_text("2026-11-30 NVIDIA H200\n" + "".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text("| shape | variant | token dens | tile dens | ms | TFLOP/s | efficiency | vs cuDNN | Flex ms "
                        "| Flex/ours | err | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "".join(
                            f"| {r['shape']} | {r['variant']} | {r['token_density']:.3f} | 0.1 | {r['ms']:.6f} | "
                            f"1 |  |  |  |  |  | {r['note']} |\n" for r in rows))
    got = T.fit(T.read_rows(str(path)), "cogvideox")
    assert [r["variant"] for r in got["rows"]] == [r["variant"] for r in rows
                                                   if "[" not in r["variant"] and "multi" not in r["variant"]]
    assert got["a"] == pytest.approx(a, rel=1e-3) and got["b"] == pytest.approx(b, rel=1e-3)
    assert got["e"] == pytest.approx(e, rel=1e-2, abs=1e-4)
    assert got["masked_tile"] == pytest.approx(b / a, rel=1e-3)
    for r in got["rows"]:  # the split adds up to the model's time
        assert r["ideal"] + r["tiles"] + r["masked"] + r["programs"] == pytest.approx(r["fitted"], rel=1e-3)
        assert r["fitted"] == pytest.approx(r["ms"], rel=1e-4)
    tagged = T.fit(T.read_rows(str(path)), "cogvideox", "[triton]")  # every time doubled: costs doubled
    assert tagged["a"] == pytest.approx(2 * a, rel=1e-3) and tagged["masked_tile"] == pytest.approx(b / a, rel=1e-3)
    assert "masked tile costs" in T.report(got)
    assert got["programs"] == 353 * 48  # CogVideoX1.5's segment-aligned q-tiles (2 text, 351 grid) x 48 heads


def test_fit_needs_our_dense_row_and_two_sparse_rows(tmp_path):
    rows = _rows(4e-6, 1e-5, 0.1, random.Random(0))
    path = tmp_path / "log.txt"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if "ours dense" not in r["variant"]))
    with pytest.raises(ValueError, match="need our dense row"):
        T.fit(T.read_rows(str(path)), "cogvideox")


@pytest.mark.parametrize("n_tiles", [1, 2, 3])
def test_probe_tables_visit_their_first_k_tiles_full_or_masked_alike(n_tiles):
    geom = VideoGeometry(frames=2, height=5, width=7, prefix=9)  # L = 79: k-tiles of 32, the last one cut
    heads, L, d = 2, geom.seq_len, 64
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    q, k, v = (torch.randn(1, heads, L, d, generator=gen) for _ in range(3))
    outs = []
    for full in (True, False):
        tables = T.probe_tables(geom, heads, n_tiles, full, block_m=32, block_n=32, device="cpu")
        tables.validate(check_contents=True)
        assert tables.runs[:, 2].eq(int(full)).all() and tables.runs[:, 1].eq(n_tiles).all()
        outs.append(sparse_attention(q, k, v, tables))
    keys = min(L, 32 * n_tiles)
    s = (q.double() @ k.double().transpose(-1, -2))[..., :keys] / d ** 0.5
    want = s.softmax(-1) @ v.double()[:, :, :keys]
    for out in outs:
        assert ((out.double() - want).norm() / want.norm()).item() <= 1e-5


def test_probe_times_every_size_full_and_masked_and_fits_its_costs(monkeypatch):
    # the probe's own code on the CPU (the Triton kernel under the interpreter), a tiny shape and a timer
    # that runs each layer once and returns a time with known costs: 2 per full tile, 3 per masked tile
    # and 5 per program (in tile units of one program)
    from sparse_vdit.bench import attention

    geom = VideoGeometry(frames=2, height=16, width=18, prefix=40)  # L = 616: 10 k-tiles of 64, the last cut
    monkeypatch.setitem(attention.SHAPES, "tiny", ("Tiny", geom, 2, 64))
    monkeypatch.setitem(T.SHAPES, "tiny", ("Tiny", geom, 2, 64))
    seen = []

    def timer(fn):
        out = fn()
        assert out.shape == (1, 2, geom.seq_len, 64) and not out.isnan().any()
        tables = seen[-1]
        n = int(tables.runs[0, 1])
        return (2.0 if int(tables.runs[0, 2]) else 3.0) * n + 5.0

    real = T.probe_tables
    monkeypatch.setattr(T, "probe_tables", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    (result,) = T.probe("tiny", ["0"], device="cpu", dtype=torch.float32, timer=timer)
    assert result["sizes"] == [8, 9] and len(seen) == 4  # 9 whole k-tiles: larger sizes clipped to them
    assert set(result["ms"]) == {(n, full) for n in (8, 9) for full in (True, False)}
    assert result["masked_tile"] == pytest.approx(1.5) and result["program_tiles"] == pytest.approx(2.5)
    assert result["programs"] == 2 * 6  # 1 text q-tile (40 rows) and 5 grid q-tiles (576 rows), 2 heads
    assert "a masked tile costs 1.50 full tiles, a program 2.5 full tiles" in T.probe_report([result])


def test_command_line_needs_results_or_the_probe_and_the_probe_a_gpu():
    with pytest.raises(SystemExit):
        T.main([])  # neither
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            T.main(["--probe", "--shape", "cogvideox", "--gluon", "0,auto"])
