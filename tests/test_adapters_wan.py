"""Wan adapter: stock parity of the all-dense controller, what the controller sees, fallback, removal."""

import warnings

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from sparse_vdit.adapters import wan
from sparse_vdit.adapters.common import DenseController
from sparse_vdit.adapters.loading import shipped_config
from sparse_vdit.strategies.geometry import VideoGeometry


def tiny_wan(seed=0):
    torch.manual_seed(seed)
    return WanTransformer3DModel.from_config(shipped_config("wan-tiny")).eval()


def wan_inputs(seed=1, batch=1, shape=(3, 6, 10)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *shape, generator=g)
    ctx = torch.randn(batch, 7, 32, generator=g)
    return dict(hidden_states=x, timestep=torch.tensor([700.0] * batch), encoder_hidden_states=ctx, return_dict=False)


class Recorder:
    """Records every call and answers with dense."""

    def __init__(self):
        self.calls = []

    def attention(self, q, k, v, *, layer, sigma, geometry, layout, dense, kv_len=None):
        self.calls.append(dict(layer=layer, sigma=sigma, geometry=geometry, layout=layout, shape=tuple(q.shape), kv_len=kv_len))
        return dense(q, k, v)


@pytest.mark.parametrize("batch", [1, 2])
def test_all_dense_controller_is_bit_identical_to_stock(batch):
    model = tiny_wan()
    inputs = wan_inputs(batch=batch)
    with torch.no_grad():
        stock = model(**inputs)[0]
        with wan.install(model, DenseController()):
            patched = model(**inputs)[0]
        restored = model(**inputs)[0]
    assert torch.equal(stock, patched)
    assert torch.equal(stock, restored)
    assert all(type(p) is WanAttnProcessor for p in model.attn_processors.values())


def test_controller_sees_layers_geometry_layout_and_sigma():
    model = tiny_wan()
    recorder = Recorder()
    with torch.no_grad(), wan.install(model, recorder) as handle:
        model(**wan_inputs())
        handle.begin_step(0.25, 3)
        model(**wan_inputs())
    assert [c["layer"] for c in recorder.calls] == [0, 1, 0, 1]
    assert {c["geometry"] for c in recorder.calls} == {VideoGeometry(3, 3, 5)}
    assert {c["layout"] for c in recorder.calls} == {"blhd"}
    assert {c["shape"] for c in recorder.calls} == {(1, 45, 2, 16)}
    assert [c["sigma"] for c in recorder.calls] == [0.7, 0.7, 0.25, 0.25]  # timestep/1000, then pinned


def test_controller_output_is_used():
    """A controller that zeroes attention changes the model output exactly as zeroing to_out's input."""
    class Zero:
        def attention(self, q, k, v, **kw):
            return torch.zeros_like(q)

    model = tiny_wan()
    with torch.no_grad():
        with wan.install(model, Zero()):
            zeroed = model(**wan_inputs())[0]
        for block in model.blocks:  # same effect by hand: to_out sees zeros -> its bias only
            block.attn1.to_out[0].weight.zero_()
        by_hand = model(**wan_inputs())[0]
    torch.testing.assert_close(zeroed, by_hand, rtol=0, atol=1e-6)


def test_controller_value_error_falls_back_to_dense_with_one_warning():
    class Refuses:
        def attention(self, q, k, v, **kw):
            raise ValueError("sequence length 45 does not match")

    model = tiny_wan()
    with torch.no_grad():
        stock = model(**wan_inputs())[0]
        with wan.install(model, Refuses()):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = model(**wan_inputs())[0]
                model(**wan_inputs())
    assert torch.equal(out, stock)
    assert len([w for w in caught if "runs dense" in str(w.message)]) == 1


def test_bad_install_and_geometry_inputs_raise():
    model = tiny_wan()
    with pytest.raises(ValueError, match="no attention"):
        wan.install(model, object())
    handle = wan.install(model, DenseController())
    with pytest.raises(ValueError, match="already installed"):
        wan.install(model, DenseController())
    handle.remove()
    handle.remove()  # idempotent
    with pytest.raises(ValueError, match="not divisible"):
        wan.wan_geometry((1, 4, 3, 7, 10), (1, 2, 2))
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        wan.wan_geometry((4, 3, 6, 10), (1, 2, 2))
