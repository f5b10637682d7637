"""Self-attention sites of every family: stock parity of the all-dense controller, what the
controller sees, fallback to dense, removal; HunyuanVideo padded text; CogVideoX RoPE."""

import warnings

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel

from sparse_vdit.adapters import cogvideox, hunyuan, wan
from sparse_vdit.adapters.common import DenseController
from sparse_vdit.adapters.loading import shipped_config
from sparse_vdit.strategies.geometry import VideoGeometry


def build(cls, variant, seed=0):
    torch.manual_seed(seed)
    return cls.from_config(shipped_config(variant)).eval()


def wan_case(batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    inputs = dict(hidden_states=torch.randn(batch, 4, 3, 6, 10, generator=g), timestep=torch.tensor([700.0] * batch),
                  encoder_hidden_states=torch.randn(batch, 7, 32, generator=g), return_dict=False)
    return build(WanTransformer3DModel, "wan-tiny"), wan.install, inputs, VideoGeometry(3, 3, 5), "blhd"


def hunyuan_case(batch=1, seed=1, valid=None):
    g = torch.Generator().manual_seed(seed)
    n_text = 6
    mask = torch.ones(batch, n_text)
    for b, n in enumerate(valid or []):
        mask[b, n:] = 0
    inputs = dict(hidden_states=torch.randn(batch, 4, 3, 6, 10, generator=g), timestep=torch.tensor([700.0] * batch),
                  encoder_hidden_states=torch.randn(batch, n_text, 32, generator=g), encoder_attention_mask=mask,
                  pooled_projections=torch.randn(batch, 16, generator=g), guidance=torch.tensor([6000.0] * batch),
                  return_dict=False)
    model = build(HunyuanVideoTransformer3DModel, "hunyuanvideo-tiny")
    return model, hunyuan.install, inputs, VideoGeometry(3, 3, 5, suffix=n_text), "blhd"


def cogvideox_case(batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    model = build(CogVideoXTransformer3DModel, "cogvideox1.5-tiny")
    x = torch.randn(batch, 4, 4, 6, 10, generator=g)
    inputs = dict(hidden_states=x, timestep=torch.tensor([700] * batch),
                  encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
                  image_rotary_emb=cogvideox.cogvideox_rope(model.config, x.shape), return_dict=False)
    return model, cogvideox.install, inputs, VideoGeometry(2, 3, 5, prefix=5), "bhld"


CASES = {"wan": wan_case, "hunyuan": hunyuan_case, "cogvideox": cogvideox_case}
LAYERS = {"wan": 2, "hunyuan": 4, "cogvideox": 2}


class Recorder:
    """Records every call and answers with dense."""

    def __init__(self):
        self.calls = []

    def attention(self, q, k, v, *, layer, sigma, geometry, layout, dense, kv_len=None):
        self.calls.append(dict(layer=layer, sigma=sigma, geometry=geometry, layout=layout, shape=tuple(q.shape),
                               kv_len=None if kv_len is None else kv_len.tolist()))
        return dense(q, k, v)


@pytest.mark.parametrize("family", CASES)
@pytest.mark.parametrize("batch", [1, 2])
def test_all_dense_controller_is_bit_identical_to_stock(family, batch):
    model, install, inputs, _, _ = CASES[family](batch=batch)
    stock_types = {name: type(p) for name, p in model.attn_processors.items()}
    with torch.no_grad():
        stock = model(**inputs)[0]
        with install(model, DenseController()):
            patched = model(**inputs)[0]
        restored = model(**inputs)[0]
    assert torch.equal(stock, patched)
    assert torch.equal(stock, restored)
    assert {name: type(p) for name, p in model.attn_processors.items()} == stock_types


@pytest.mark.parametrize("family", CASES)
def test_controller_sees_layers_geometry_layout_and_sigma(family):
    model, install, inputs, geometry, layout = CASES[family]()
    recorder = Recorder()
    with torch.no_grad(), install(model, recorder) as handle:
        model(**inputs)
        handle.begin_step(0.25, 3)
        model(**inputs)
    n = LAYERS[family]
    assert [c["layer"] for c in recorder.calls] == list(range(n)) * 2
    assert {c["geometry"] for c in recorder.calls} == {geometry}
    assert {c["layout"] for c in recorder.calls} == {layout}
    seq_axis = 2 if layout == "bhld" else 1
    assert {c["shape"][seq_axis] for c in recorder.calls} == {geometry.seq_len}
    assert {c["shape"][3] for c in recorder.calls} == {16}
    assert [c["sigma"] for c in recorder.calls] == [0.7] * n + [0.25] * n  # timestep / 1000, then pinned
    assert {str(c["kv_len"]) for c in recorder.calls} == {"None"}


@pytest.mark.parametrize("family", CASES)
def test_controller_output_is_used(family):
    """A controller answering zeros gives the output of a model whose attention output projection
    sees zeros (by hand: zero its weight), so the processor really uses what the controller returns."""
    class Zero:
        def attention(self, q, k, v, **kw):
            return torch.zeros_like(q)

    model, install, inputs, _, _ = CASES[family]()
    sites = {"wan": wan.wan_sites, "hunyuan": hunyuan.hunyuan_sites, "cogvideox": cogvideox.cogvideox_sites}[family]
    with torch.no_grad():
        with install(model, Zero()):
            zeroed = model(**inputs)[0]
        stock = model(**inputs)[0]
        for _, attn in sites(model):
            for linear in [getattr(attn, "to_out", None) and attn.to_out[0], getattr(attn, "to_add_out", None)]:
                if linear is not None:
                    linear.weight.zero_()
        if family == "hunyuan":  # single blocks mix attention into proj_out: zero its attention columns
            for block in model.single_transformer_blocks:
                block.proj_out.weight[:, : block.attn.inner_dim].zero_()
        by_hand = model(**inputs)[0]
    assert not torch.allclose(zeroed, stock)
    torch.testing.assert_close(zeroed, by_hand, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", CASES)
def test_controller_value_error_falls_back_to_dense_with_one_warning(family):
    class Refuses:
        def attention(self, q, k, v, **kw):
            raise ValueError("sequence length does not match")

    model, install, inputs, _, _ = CASES[family]()
    with torch.no_grad():
        stock = model(**inputs)[0]
        with install(model, Refuses()):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = model(**inputs)[0]
                model(**inputs)
    assert torch.equal(out, stock)
    assert len([w for w in caught if "runs dense" in str(w.message)]) == 1


def test_hunyuan_padded_text_batch1_is_trimmed_and_matches_the_masked_stock():
    model, install, inputs, _, _ = hunyuan_case(valid=[4])
    recorder = Recorder()
    with torch.no_grad():
        stock = model(**inputs)[0]
        with install(model, recorder):
            out = model(**inputs)[0]
    assert {c["geometry"] for c in recorder.calls} == {VideoGeometry(3, 3, 5, suffix=4)}
    assert {c["shape"] for c in recorder.calls} == {(1, 49, 2, 16)} and {c["kv_len"] is None for c in recorder.calls} == {True}
    torch.testing.assert_close(out, stock, rtol=0, atol=1e-5)


def test_hunyuan_padded_text_batch2_passes_per_sample_key_lengths_bit_identically():
    model, install, inputs, geometry, _ = hunyuan_case(batch=2, valid=[4, 6])
    recorder = Recorder()
    with torch.no_grad():
        stock = model(**inputs)[0]
        with install(model, recorder):
            out = model(**inputs)[0]
    assert {c["geometry"] for c in recorder.calls} == {geometry}
    assert {str(c["kv_len"]) for c in recorder.calls} == {str([45 + 4, 45 + 6])}
    assert torch.equal(out, stock)


def test_hunyuan_layers_number_dual_then_single_blocks():
    model = build(HunyuanVideoTransformer3DModel, "hunyuanvideo-tiny")
    sites = hunyuan.hunyuan_sites(model)
    assert [i for i, _ in sites] == [0, 1, 2, 3]
    assert sites[2][1] is model.single_transformer_blocks[0].attn
    assert len(model.attn_processors) == 5  # the refiner's attention stays stock, untouched
    with hunyuan.install(model, DenseController()):
        refiner = model.context_embedder.token_refiner.refiner_blocks[0].attn
        assert type(refiner.processor).__name__ == "AttnProcessor2_0"


def test_bad_install_and_geometry_inputs_raise():
    model, install, _, _, _ = wan_case()
    with pytest.raises(ValueError, match="no attention"):
        install(model, object())
    handle = install(model, DenseController())
    with pytest.raises(ValueError, match="already installed"):
        install(model, DenseController())
    handle.remove()
    handle.remove()  # idempotent
    with pytest.raises(ValueError, match="not divisible"):
        wan.wan_geometry((1, 4, 3, 7, 10), (1, 2, 2))
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        wan.wan_geometry((4, 3, 6, 10), (1, 2, 2))
    with pytest.raises(ValueError, match="not divisible"):
        cogvideox.cogvideox_geometry((1, 3, 4, 6, 10), 2, 2, 5)
    with pytest.raises(ValueError, match="not divisible"):
        hunyuan.hunyuan_geometry((1, 4, 3, 6, 9), 2, 1, 5)
    config = shipped_config("cogvideox1.5-tiny")
    model = CogVideoXTransformer3DModel.from_config(config)
    with pytest.raises(ValueError, match="exceeds the RoPE grid"):
        cogvideox.cogvideox_rope(model.config, (1, 4, 4, 80, 10))
