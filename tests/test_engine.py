"""SparseEngine: dense routes are untouched, sparse routes exact, bad input raises, one warning."""

import math
import re
import warnings
from pathlib import Path

import pytest
import torch

from sparse_vdit.strategies.engine import SparseEngine, sdpa_dense
from sparse_vdit.strategies.geometry import VideoGeometry
from sparse_vdit.strategies.patterns import Dense, Diagonal, LocalWindow, MultiDiagonal, Skip, Union, VerticalStripe
from sparse_vdit.strategies.strategy import Strategy
from test_plan import oracle

GEOM = VideoGeometry(3, 4, 5, prefix=2, suffix=3)
HEAD0 = (Diagonal(0.5), MultiDiagonal(0.3), Skip())
HEAD1 = (Union(LocalWindow(1, 0.3, 0.3), VerticalStripe()), Dense(), Diagonal(0.2))


def strategy(**kw):
    # bucket 0: sigma in (0.5, inf]; bucket 1: (0, 0.5]; layer 1 is all Dense in bucket 0
    table = ((HEAD0, (Dense(),) * 3), (HEAD1, HEAD0))
    return Strategy(2, 3, (math.inf, 0.5, 0.0), table, **kw)


class Recorder:
    """A dense function that counts calls and returns a fresh tensor."""

    def __init__(self):
        self.calls, self.last = 0, None

    def __call__(self, q, k, v):
        self.calls += 1
        self.last = torch.full_like(q, 7.0)
        return self.last


def qkv(layout="bhld", D=64, B=2, dtype=torch.float32, heads=3, length=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = GEOM.seq_len if length is None else length
    shape = (B, heads, L, D) if layout == "bhld" else (B, L, heads, D)
    return tuple(torch.randn(shape, generator=g).to(dtype) for _ in range(3))


def test_dense_routes_return_the_dense_output_untouched():
    eng = SparseEngine(strategy(dense_above_sigma=2.0, dense_layers={1}), backend="reference")
    q, k, v = qkv()
    for layer, sigma in ((0, 3.0), (1, 0.3), (1, 1.0)):  # warm-up, dense layer, dense layer
        rec = Recorder()
        assert eng.attention(q, k, v, layer=layer, sigma=sigma, geometry=GEOM, layout="bhld", dense=rec) is rec.last
        assert rec.calls == 1
    eng = SparseEngine(strategy(), backend="reference")
    rec = Recorder()  # layer 1, bucket 0: every head Dense
    assert eng.attention(q, k, v, layer=1, sigma=0.9, geometry=GEOM, layout="bhld", dense=rec) is rec.last
    assert eng.plan(1, 0.9, GEOM, 64) is None


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_sparse_route_follows_the_sigma_bucket_exactly(layout):
    eng = SparseEngine(strategy(), backend="reference")
    q, k, v = qkv(layout, seed=1)
    kv_len = torch.tensor([GEOM.seq_len, 40], dtype=torch.int32)
    rec = Recorder()
    for sigma, layer, heads in ((0.9, 0, HEAD0), (0.2, 0, HEAD1), (0.5, 1, HEAD0)):
        out = eng.attention(q, k, v, layer=layer, sigma=sigma, geometry=GEOM, layout=layout, dense=rec,
                            kv_len=kv_len)
        assert torch.allclose(out.double(), oracle(q, k, v, heads, GEOM, kv_len, layout), rtol=1e-5, atol=1e-5)
    assert rec.calls == 0
    assert eng.plan(0, 0.9, GEOM, 64) is eng.plan(0, 0.7, GEOM, 64)       # one plan per bucket
    assert eng.plan(0, 0.9, GEOM, 64) is not eng.plan(0, 0.2, GEOM, 64)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_triton_route_sends_dense_heads_of_a_mixed_layer_to_the_dense_function(layout):
    pytest.importorskip("triton")
    eng = SparseEngine(strategy())
    q, k, v = qkv(layout, D=64, B=2, seed=2)
    if eng._route(q) != "triton":
        pytest.skip("no Triton path for CPU tensors here (needs TRITON_INTERPRET=1)")
    seen = []

    def dense(q_, k_, v_):  # the call site's dense attention, on the heads it is given
        seen.append(q_.shape)
        return sdpa_dense(layout)(q_, k_, v_)

    out = eng.attention(q, k, v, layer=0, sigma=0.2, geometry=GEOM, layout=layout, dense=dense)
    expected = oracle(q, k, v, HEAD1, GEOM, None, layout)
    assert (out.double() - expected).norm() / expected.norm() <= 1e-5
    one_head = (2, 1, GEOM.seq_len, 64) if layout == "bhld" else (2, GEOM.seq_len, 1, 64)
    assert seen == [one_head]  # HEAD1's Dense() only; the other two ran in the kernel
    marker = Recorder()  # what the dense function returns is what that head outputs
    out = eng.attention(q, k, v, layer=0, sigma=0.2, geometry=GEOM, layout=layout, dense=marker)
    picked = out[:, 1] if layout == "bhld" else out[:, :, 1]
    assert marker.calls == 1 and torch.equal(picked, torch.full_like(picked, 7.0))
    rest = [0, 2]
    got = out[:, rest] if layout == "bhld" else out[:, :, rest]
    want = expected[:, rest] if layout == "bhld" else expected[:, :, rest]
    assert (got.double() - want).norm() / want.norm() <= 1e-5


def test_unsupported_head_dim_runs_dense_with_one_warning():
    eng = SparseEngine(strategy())
    q, k, v = qkv(D=32)
    rec = Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert eng.attention(q, k, v, layer=0, sigma=0.9, geometry=GEOM, layout="bhld", dense=rec) is rec.last
    assert rec.calls == 3
    assert len([w for w in caught if "dense" in str(w.message)]) == 1
    assert "head_dim 32" in str(caught[0].message)


def test_force_reference_runs_the_reference_instead_of_dense():
    eng = SparseEngine(strategy(), force_reference=True)
    q, k, v = qkv(D=32, dtype=torch.float64, seed=3)
    rec = Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = eng.attention(q, k, v, layer=0, sigma=0.9, geometry=GEOM, layout="bhld", dense=rec)
    assert rec.calls == 0 and out.dtype == torch.float64
    assert torch.allclose(out, oracle(q, k, v, HEAD0, GEOM, None, "bhld"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change,match", [
    (dict(layer=2), "layer 2 is out of range"), (dict(layer=-1), "out of range"),
    (dict(geometry=VideoGeometry(3, 4, 5)), "sequence length 65.*60 tokens"), (dict(geometry=(3, 4, 5)), "VideoGeometry"),
    (dict(layout="bshd"), "layout"), (dict(sigma=float("nan")), "sigma"), (dict(sigma="0.5"), "sigma"),
    (dict(heads=4), "4 heads"), (dict(k_len=60), "k shape"), (dict(v_dtype=torch.float64), "v dtype"),
    (dict(q_dim=3), "4-D"), (dict(k_device="meta"), "k is on meta"),
])
def test_bad_input_raises_value_error_naming_the_mismatch(change, match):
    eng = SparseEngine(strategy(), backend="reference")
    q, k, v = qkv(heads=change.get("heads", 3))
    if "k_len" in change:
        k = k[:, :, : change["k_len"]]
    if "v_dtype" in change:
        v = v.to(change["v_dtype"])
    if "q_dim" in change:
        q = q[0]
    if "k_device" in change:
        k = k.to(change["k_device"])
    kwargs = dict(layer=0, sigma=0.3, geometry=GEOM, layout="bhld", dense=Recorder())
    kwargs.update({key: val for key, val in change.items() if key in kwargs})
    with pytest.raises(ValueError, match=match):
        eng.attention(q, k, v, **kwargs)


def test_engine_rejects_bad_construction():
    with pytest.raises(ValueError, match="Strategy"):
        SparseEngine("strategy.safetensors")
    with pytest.raises(ValueError, match="backend"):
        SparseEngine(strategy(), backend="cuda")


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_sdpa_dense_matches_softmax_attention(layout):
    q, k, v = qkv(layout, seed=4)
    out = sdpa_dense(layout)(q, k, v)
    qb, kb, vb = ((t if layout == "bhld" else t.transpose(1, 2)).double() for t in (q, k, v))
    ref = torch.softmax(qb @ kb.transpose(-1, -2) / 8.0, dim=-1) @ vb
    ref = ref if layout == "bhld" else ref.transpose(1, 2)
    assert out.shape == q.shape and torch.allclose(out.double(), ref, atol=1e-5)
    with pytest.raises(ValueError, match="layout"):
        sdpa_dense("lbhd")


def test_documented_api_example_runs(capsys):
    doc = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "docs/api.md", "exec"), {})
    assert "tile density" in capsys.readouterr().out


def test_attention_under_torch_compile_follows_sigma():
    eng = SparseEngine(strategy(dense_above_sigma=2.0), backend="reference")
    q, k, v = qkv(seed=5)
    dense = sdpa_dense("bhld")

    def block(q, k, v, sigma):
        return eng.attention(q, k, v, layer=0, sigma=sigma, geometry=GEOM, layout="bhld", dense=dense) + 1

    compiled = torch.compile(block, backend="eager")
    for sigma, heads in ((3.0, None), (0.9, HEAD0), (0.2, HEAD1)):
        out = compiled(q, k, v, sigma) - 1
        expected = dense(q, k, v).double() if heads is None else oracle(q, k, v, heads, GEOM, None, "bhld")
        assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
