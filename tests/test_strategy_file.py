"""Strategy files: round trip, fingerprints, and every bad-file case raising its StrategyError."""

import json
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sparse_vdit.strategies.file import (FORMAT_VERSION, METADATA_KEY, SearchRecord, StrategyError,
                                         load_strategy, model_fingerprint, read_header, save_strategy,
                                         strategy_summary, warn_if_far)
from sparse_vdit.strategies.geometry import VideoGeometry
from sparse_vdit.strategies.patterns import (Dense, Diagonal, LocalWindow, MultiDiagonal, Skip, Union,
                                             VerticalStripe)
from sparse_vdit.strategies.strategy import Strategy

GEOM = VideoGeometry(3, 4, 5, prefix=2)
CANDS = (Dense(), Skip(), Diagonal(0.5), MultiDiagonal(0.2), LocalWindow(1, 0.25, 0.4),
         VerticalStripe(1.0), Union(Diagonal(0.25), VerticalStripe(0.5)))


def _strategy(seed=0, buckets=3, layers=4, heads=5, record=True):
    gen = torch.Generator().manual_seed(seed)
    choice = torch.randint(0, len(CANDS), (buckets, layers, heads), generator=gen)
    patterns = tuple(tuple(tuple(CANDS[int(c)] for c in choice[b, l]) for l in range(layers)) for b in range(buckets))
    meta = {"model": model_fingerprint(None, layers=layers, heads=heads, head_dim=64, family="wan", variant="t"),
            "geometry": GEOM}
    if record:
        meta["record"] = SearchRecord(CANDS, torch.rand(buckets, layers, heads, len(CANDS), generator=gen),
                                      torch.rand(len(CANDS), generator=gen), torch.rand(buckets, generator=gen),
                                      torch.ones(buckets), 5.0)
    return Strategy(layers=layers, heads=heads, sigma_edges=(2.0, 0.8, 0.4, 0.0), patterns=patterns,
                    dense_above_sigma=0.8, dense_layers=frozenset({1}), meta=meta)


def test_round_trip_identical(tmp_path):
    s = _strategy()
    path = tmp_path / "s.safetensors"
    save_strategy(s, path, gpu="test-gpu", schedule={"steps": 3}, search={"target_speedup": 2.0})
    t = load_strategy(path)
    assert t.patterns == s.patterns
    assert t.sigma_edges == s.sigma_edges
    assert t.dense_above_sigma == s.dense_above_sigma and t.dense_layers == s.dense_layers
    assert (t.layers, t.heads) == (s.layers, s.heads)
    a, b = s.meta["record"], t.meta["record"]
    assert a.candidates == b.candidates
    for name in ("errors", "cost", "step_weights", "bucket_steps"):
        assert torch.equal(getattr(a, name).float(), getattr(b, name))
    assert b.dense_layer == a.dense_layer
    assert t.meta["gpu"] == "test-gpu" and t.meta["search"]["target_speedup"] == 2.0
    assert t.meta["geometry"]["width"] == 5 and t.meta["model"]["family"] == "wan"
    # saving the loaded strategy again gives the same tables
    save_strategy(t, tmp_path / "again.safetensors")
    u = load_strategy(tmp_path / "again.safetensors")
    assert u.patterns == s.patterns and torch.equal(u.meta["record"].errors, b.errors)


def test_hand_made_strategy_without_record(tmp_path):
    s = _strategy(record=False)
    save_strategy(s, tmp_path / "h.safetensors")
    t = load_strategy(tmp_path / "h.safetensors")
    assert t.patterns == s.patterns and t.meta["record"] is None


def test_fingerprint_tells_weights_apart(tmp_path):
    torch.manual_seed(0)
    m1, m2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    f1 = model_fingerprint(m1, layers=4, heads=5, head_dim=64)
    f2 = model_fingerprint(m2, layers=4, heads=5, head_dim=64)
    assert f1["weights_hash"] != f2["weights_hash"]
    assert f1 == model_fingerprint(m1, layers=4, heads=5, head_dim=64)
    s = _strategy()
    path = tmp_path / "s.safetensors"
    save_strategy(s, path, fingerprint=f1)
    assert load_strategy(path, expect_fingerprint=f1).patterns == s.patterns
    with pytest.raises(StrategyError, match="different model: weights_hash") as e:
        load_strategy(path, expect_fingerprint=f2)
    assert e.value.code == StrategyError.WRONG_MODEL
    with pytest.raises(StrategyError, match="heads 5 .file. vs 8 .model.") as e:
        load_strategy(path, expect_fingerprint={**f1, "heads": 8})
    assert e.value.code == StrategyError.WRONG_MODEL


def _write_raw(path, header: dict, payload: bytes = b""):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + payload)


def _rewrite_doc(src, dst, edit):
    """Copy a strategy file, editing its JSON metadata document."""
    with open(src, "rb") as fh:
        data = fh.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    doc = json.loads(header["__metadata__"][METADATA_KEY])
    edit(doc)
    header["__metadata__"][METADATA_KEY] = json.dumps(doc)
    _write_raw(dst, header, data[8 + n:])


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    save_strategy(_strategy(), path)
    return path


def _expect(path, code, words):
    with pytest.raises(StrategyError, match=words) as e:
        load_strategy(path)
    assert e.value.code == code, str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_file(tmp_path):
    _expect(tmp_path / "nope.safetensors", StrategyError.NOT_FOUND, "not found")


def test_truncated(good, tmp_path):
    data = Path(good).read_bytes()
    for cut in (4, 8 + 10, len(data) - 7):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(StrategyError, match="too short|truncated|corrupt"):
            load_strategy(bad)


def test_random_bytes(tmp_path):
    gen = torch.Generator().manual_seed(3)
    for i in range(5):
        bad = tmp_path / f"rand{i}.safetensors"
        bad.write_bytes(bytes(torch.randint(0, 256, (1000,), generator=gen, dtype=torch.uint8).tolist()))
        with pytest.raises(StrategyError) as e:
            load_strategy(bad)
        assert e.value.code in (StrategyError.NOT_SAFETENSORS, StrategyError.CORRUPT)
        assert "strategy file" in str(e.value) or "corrupt" in str(e.value)


def test_huge_header(tmp_path):
    bad = tmp_path / "huge.safetensors"
    bad.write_bytes(struct.pack("<Q", 1 << 40) + b"{}" * 10)
    _expect(bad, StrategyError.NOT_SAFETENSORS, "above the .* byte limit")
    bad.write_bytes(struct.pack("<Q", 5000) + b"{}" * 10)  # under the cap, over the file size
    _expect(bad, StrategyError.CORRUPT, "truncated or corrupt")


def test_weights_file_is_not_a_strategy(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"blocks.0.attn1.to_q.weight": torch.randn(4, 4)}, str(path))
    _expect(path, StrategyError.NOT_A_STRATEGY, "not a Sparse-vDiT strategy")


def test_newer_format(good, tmp_path):
    bad = tmp_path / "future.safetensors"
    _rewrite_doc(good, bad, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    _expect(bad, StrategyError.NEWER_VERSION, "newer Sparse-vDiT")
    assert read_header(good)["format_version"] == FORMAT_VERSION


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.update(candidates=d["candidates"][:3]), "pattern index out of range"),
    (lambda d: d.update(candidates=[]), "candidate pattern list"),
    (lambda d: d["candidates"].__setitem__(2, {"name": "diagonal", "width": -1.0}), "candidate pattern is invalid"),
    (lambda d: d["candidates"].__setitem__(2, {"name": "wobbly"}), "candidate pattern is invalid"),
    (lambda d: d.update(dense_layers=[99]), "dense_layers"),
    (lambda d: d.update(dense_above_sigma=-1.0), "dense_above_sigma"),
    (lambda d: d.update(model={"layers": 7}), "layers=7"),
])
def test_unusable_metadata(good, tmp_path, edit, words):
    bad = tmp_path / "bad.safetensors"
    _rewrite_doc(good, bad, edit)
    _expect(bad, StrategyError.BAD_VALUES, words)


@pytest.mark.parametrize("change, words", [
    (lambda t: t.update(sigma_edges=torch.tensor([2.0, 0.4, 0.8, 0.0], dtype=torch.float64)), "descending"),
    (lambda t: t.update(sigma_edges=torch.tensor([2.0, 0.8, 0.0], dtype=torch.float64)), "sigma_edges"),
    (lambda t: t.update(errors=-t["errors"]), "negative or infinite"),
    (lambda t: t.update(cost=t["cost"] * float("inf")), "negative or infinite"),
    (lambda t: t.update(errors=t["errors"][:, :, :, :3].contiguous()), "error table shape"),
    (lambda t: t.update(choice=t["choice"].float()), "choice table"),
    (lambda t: t.pop("choice"), "is missing"),
])
def test_unusable_tensors(good, tmp_path, change, words):
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(StrategyError, match=words) as e:
        load_strategy(bad)
    assert e.value.code in (StrategyError.BAD_VALUES, StrategyError.CORRUPT)


def test_far_geometry_warns_once():
    s = _strategy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not warn_if_far(s, VideoGeometry(4, 5, 6, prefix=2))
        assert warn_if_far(s, VideoGeometry(3, 40, 5, prefix=2))
        assert not warn_if_far(s, VideoGeometry(3, 40, 5, prefix=2))
    assert len(caught) == 1 and "height" in str(caught[0].message)


def test_summary_counts_modes_and_density():
    s = _strategy()
    out = strategy_summary(s, GEOM)
    assert len(out["layers"]) == 4 and out["dense_layers"] == [1]
    assert out["layers"][1]["density"] == 1.0 and out["layers"][1]["modes"] == {"dense": 15}
    for l in (0, 2, 3):
        row = out["layers"][l]
        assert sum(row["modes"].values()) == 15
        # bucket 0 lies above dense_above_sigma: counted dense
        expect = (5 + sum(p.density(GEOM) for b in (1, 2) for p in s.patterns[b][l])) / 15
        assert row["density"] == pytest.approx(expect)
    assert out["density"] == pytest.approx(sum(r["density"] for r in out["layers"]) / 4)
    json.dumps(out)
