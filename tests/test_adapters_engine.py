"""The adapters with the real SparseEngine: an all-dense strategy is bit-identical to stock; a
sparse strategy's outputs equal the reference engine run directly on the captured q/k/v and a
float64 masked-attention re-implementation of the patterns; sampling with a sparse strategy."""

import math

import pytest
import torch
from test_adapters_sites import CASES, LAYERS

from sparse_vdit.adapters.sampling import initial_noise, sample_wan
from sparse_vdit.strategies.engine import SparseEngine
from sparse_vdit.strategies.patterns import (
    Diagonal,
    LocalWindow,
    MultiDiagonal,
    Skip,
    Union,
    VerticalStripe,
)
from sparse_vdit.strategies.strategy import Strategy

LAYER_PATTERNS = [  # two heads per layer, cycled over the layers
    (Diagonal(0.6), MultiDiagonal(0.3, 1)),
    (VerticalStripe(0.5), Skip()),
    (LocalWindow(1, 0.4, 0.3), Union(Diagonal(0.3), VerticalStripe(0.4))),
    (MultiDiagonal(0.2), Diagonal(1.0)),
]


def sparse_strategy(layers, sigma_edges=(math.inf, 0.0), dense_above_sigma=None):
    table = tuple(LAYER_PATTERNS[i % len(LAYER_PATTERNS)] for i in range(layers))
    return Strategy(layers, 2, sigma_edges, (table,) * (len(sigma_edges) - 1), dense_above_sigma)


class Capturing:
    """Wraps an engine and keeps each call's inputs and output."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def attention(self, q, k, v, **kw):
        out = self.engine.attention(q, k, v, **kw)
        self.calls.append(dict(q=q.clone(), k=k.clone(), v=v.clone(), out=out, **kw))
        return out


def masked_attention_f64(q, k, v, patterns, geometry, layout, kv_len):
    """Softmax attention in float64 under each head's exact token mask (Skip heads: zeros)."""
    if layout == "blhd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(q)
    for h, pattern in enumerate(patterns):
        if isinstance(pattern, Skip):
            continue
        mask = pattern.token_mask(geometry).unsqueeze(0).repeat(q.shape[0], 1, 1)
        if kv_len is not None:
            for b, n in enumerate(kv_len.tolist()):
                mask[b, :, n:] = False
        scores = q[:, h] @ k[:, h].transpose(-1, -2) / math.sqrt(q.shape[-1])
        out[:, h] = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1) @ v[:, h]
    return out.transpose(1, 2) if layout == "blhd" else out


@pytest.mark.parametrize("family", CASES)
def test_all_dense_strategy_is_bit_identical_to_stock(family):
    model, install, inputs, _, _ = CASES[family](batch=2)
    engine = SparseEngine(Strategy.dense(LAYERS[family], 2), force_reference=True)
    with torch.no_grad():
        stock = model(**inputs)[0]
        with install(model, engine):
            patched = model(**inputs)[0]
    assert torch.equal(stock, patched)


@pytest.mark.parametrize("family,case_kw", [
    ("wan", {}), ("hunyuan", {}), ("cogvideox", {}),
    ("hunyuan", {"valid": [4]}),  # batch 1, padded text trimmed
    ("hunyuan", {"batch": 2, "valid": [3, 6]}),  # batch 2, per-sample key lengths
])
def test_sparse_strategy_matches_the_reference_engine_and_float64_masks(family, case_kw):
    model, install, inputs, _, layout = CASES[family](**case_kw)
    strategy = sparse_strategy(LAYERS[family])
    capture = Capturing(SparseEngine(strategy, force_reference=True))
    with torch.no_grad():
        stock = model(**inputs)[0]
        with install(model, capture):
            sparse = model(**inputs)[0]
    assert not torch.allclose(sparse, stock, atol=1e-3)
    assert [c["layer"] for c in capture.calls] == list(range(LAYERS[family]))
    direct = SparseEngine(strategy, backend="reference")
    for call in capture.calls:
        again = direct.attention(call["q"], call["k"], call["v"], layer=call["layer"], sigma=call["sigma"],
                                 geometry=call["geometry"], layout=layout, dense=call["dense"], kv_len=call["kv_len"])
        assert torch.equal(again, call["out"])
        exact = masked_attention_f64(call["q"], call["k"], call["v"], strategy.patterns_for(call["sigma"], call["layer"]),
                                     call["geometry"], layout, call["kv_len"])
        torch.testing.assert_close(call["out"].double(), exact, rtol=1e-5, atol=1e-5)


def test_sampling_with_warm_up_runs_dense_then_sparse():
    model, _, _, _, _ = CASES["wan"]()
    g = torch.Generator().manual_seed(3)
    prompt, negative = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    noise = initial_noise((1, 4, 3, 6, 10), 0)
    run = lambda controller: sample_wan(model, noise, prompt, negative_embeds=negative, steps=4, guidance=5.0,  # noqa: E731
                                        shift=3.0, controller=controller)
    with torch.no_grad():
        stock = run(None)
        all_warm_up = run(SparseEngine(sparse_strategy(2, dense_above_sigma=0.0), force_reference=True))
        capture = Capturing(SparseEngine(sparse_strategy(2, dense_above_sigma=0.8), force_reference=True))
        mixed = run(capture)
    assert torch.equal(all_warm_up, stock)
    assert not torch.allclose(mixed, stock)
    sigmas = sorted({c["sigma"] for c in capture.calls}, reverse=True)
    assert len(sigmas) == 4 and sigmas[0] > 0.8 > sigmas[-1]
    for call in capture.calls:  # warm-up steps answered by the stock dense path, later ones sparse
        dense = call["dense"](call["q"], call["k"], call["v"])
        assert torch.equal(call["out"], dense) == (call["sigma"] > 0.8)


@pytest.mark.parametrize("family,case_kw", [
    ("wan", {}), ("hunyuan", {"batch": 2, "valid": [3, 6]}), ("cogvideox", {}),
])
def test_call_site_dense_functions_take_any_subset_of_heads(family, case_kw):
    """The engine sends a mixed layer's Dense heads to the call site's dense function alone
    (LayerPlan.run): on a subset of the heads it must give those heads' slice of the full result,
    masks (HunyuanVideo's padded text) included."""
    model, install, inputs, _, layout = CASES[family](**case_kw)
    capture = Capturing(SparseEngine(sparse_strategy(LAYERS[family]), force_reference=True))
    with torch.no_grad(), install(model, capture):
        model(**inputs)
    axis = 1 if layout == "bhld" else 2
    for call in capture.calls:
        q, k, v = call["q"], call["k"], call["v"]
        full = call["dense"](q, k, v)
        index = torch.tensor([q.shape[axis] - 1])  # the last head alone
        part = call["dense"](*(t.index_select(axis, index) for t in (q, k, v)))
        torch.testing.assert_close(part, full.index_select(axis, index), rtol=1e-6, atol=1e-6)
