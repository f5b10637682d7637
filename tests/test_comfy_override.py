"""The ComfyUI attention override against call dicts that follow ComfyUI's documented contract.

No ComfyUI needed: `func` is a float64 attention with ComfyUI's signature, the controller a
recorder with SparseEngine's `attention` method (plus one test against the real engine).
"""

import copy
import math

import pytest
import torch

from sparse_vdit.nodes import override as ov
from sparse_vdit.strategies.geometry import VideoGeometry

HEADS, HEAD_DIM = 2, 64


def comfy_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                    skip_output_reshape=False, **kwargs):
    """A dense attention with the signature of ComfyUI's optimized_attention backends."""
    assert kwargs.get("_inside_attn_wrapper") is True, "the wrapper flag must be passed back"
    if skip_reshape:
        b, _, _, d = q.shape
    else:
        b, _, hd = q.shape
        d = hd // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask.double()
    out = (scores.softmax(-1) @ v.double()).to(q.dtype)
    comfy_attention.calls += 1
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(b, -1, heads * d)


comfy_attention.calls = 0


class Recorder:
    """A controller: records each call, returns head h of v times (h + 1) in the engine's layout."""

    def __init__(self):
        self.calls = []

    def attention(self, q, k, v, *, layer, sigma, geometry, layout, dense, kv_len=None):
        self.calls.append(dict(layer=layer, sigma=sigma, geometry=geometry, layout=layout,
                               shape=tuple(q.shape)))
        head_axis = 1 if layout == "bhld" else 2
        scale = torch.arange(1, q.shape[head_axis] + 1, dtype=v.dtype)
        shape = [1, 1, 1, 1]
        shape[head_axis] = -1
        return v * scale.view(shape)


class DenseController:
    """A controller that always takes the dense path it is handed (like a dense warm-up step)."""

    def attention(self, q, k, v, *, layer, sigma, geometry, layout, dense, kv_len=None):
        return dense(q, k, v)


def make_state(grid=(2, 3, 4), sigma=0.7):
    return ov.ForwardState(grid, sigma)


def qkv(batch, seq, skip_reshape, kv_seq=None, gen=None):
    kv_seq = seq if kv_seq is None else kv_seq
    if skip_reshape:
        shapes = [(batch, HEADS, seq, HEAD_DIM)] + [(batch, HEADS, kv_seq, HEAD_DIM)] * 2
    else:
        shapes = [(batch, seq, HEADS * HEAD_DIM)] + [(batch, kv_seq, HEADS * HEAD_DIM)] * 2
    return [torch.randn(s, generator=gen) for s in shapes]


def expected_scaled_v(v, skip_reshape, skip_output_reshape):
    """What Recorder's output must look like after the override's reshape back."""
    if skip_reshape:
        bhld = v
    else:
        b, seq, _ = v.shape
        bhld = v.view(b, seq, HEADS, HEAD_DIM).transpose(1, 2)
    scaled = bhld * torch.arange(1, HEADS + 1, dtype=v.dtype).view(1, -1, 1, 1)
    if skip_output_reshape:
        return scaled
    b, _, seq, _ = scaled.shape
    return scaled.transpose(1, 2).reshape(b, seq, HEADS * HEAD_DIM)


def call(override, q, k, v, options, **kw):
    return override(comfy_attention, q, k, v, HEADS, transformer_options=options,
                    _inside_attn_wrapper=True, **kw)


@pytest.mark.parametrize("skip_reshape", [False, True])
@pytest.mark.parametrize("skip_output_reshape", [False, True])
def test_both_layouts_reach_the_controller_and_come_back_in_comfy_form(skip_reshape, skip_output_reshape):
    rec = Recorder()
    override = ov.SparseAttentionOverride(rec, ov.FAMILIES["wan"], n_double=3)
    q, k, v = qkv(2, 24, skip_reshape)  # cond + uncond batched: B = 2
    options = {"block_index": 1, "block_type": "double", ov.FORWARD_KEY: make_state()}
    out = call(override, q, k, v, options, skip_reshape=skip_reshape,
               skip_output_reshape=skip_output_reshape)
    torch.testing.assert_close(out, expected_scaled_v(v, skip_reshape, skip_output_reshape))
    (c,) = rec.calls
    assert c["layer"] == 1 and c["sigma"] == pytest.approx(0.7)
    assert c["geometry"] == VideoGeometry(2, 3, 4)
    assert c["layout"] == ("bhld" if skip_reshape else "blhd")
    assert c["shape"][0] == 2


@pytest.mark.parametrize("skip_reshape", [False, True])
def test_dense_path_given_to_the_controller_is_bit_identical_to_plain_attention(skip_reshape):
    override = ov.SparseAttentionOverride(DenseController(), ov.FAMILIES["wan"], n_double=2)
    q, k, v = qkv(2, 24, skip_reshape)
    options = {ov.LAYER_KEY: 0, ov.FORWARD_KEY: make_state()}
    out = call(override, q, k, v, options, skip_reshape=skip_reshape)
    ref = comfy_attention(q, k, v, HEADS, skip_reshape=skip_reshape, _inside_attn_wrapper=True)
    assert torch.equal(out, ref)


def test_cross_attention_and_masks_pass_through_to_the_chained_override():
    rec, seen = Recorder(), []

    def previous(func, q, k, v, heads, **kwargs):
        seen.append(kwargs)
        return func(q, k, v, heads, **kwargs)

    override = ov.SparseAttentionOverride(rec, ov.FAMILIES["wan"], 3, previous=previous)
    options = {"block_index": 0, ov.FORWARD_KEY: make_state()}
    q, k, v = qkv(2, 24, False, kv_seq=7)  # Wan cross-attention to 7 text tokens
    out = call(override, q, k, v, options)
    assert torch.equal(out, comfy_attention(q, k, v, HEADS, _inside_attn_wrapper=True))
    q, k, v = qkv(1, 24, True)
    mask = torch.zeros(1, 1, 24)
    mask[..., -3:] = -1e4
    out = call(override, q, k, v, options, skip_reshape=True, mask=mask)
    ref = comfy_attention(q, k, v, HEADS, mask=mask, skip_reshape=True, _inside_attn_wrapper=True)
    assert torch.equal(out, ref)
    assert rec.calls == []
    assert len(seen) == 2 and seen[1]["mask"] is mask and seen[1]["transformer_options"] is options
    assert all(s["_inside_attn_wrapper"] is True for s in seen)


def test_calls_without_a_block_tag_or_shorter_than_the_grid_stay_dense():
    rec = Recorder()
    override = ov.SparseAttentionOverride(rec, ov.FAMILIES["hunyuan_video"], n_double=2)
    q, k, v = qkv(2, 8, True)  # HunyuanVideo text refiner: text only, no block tag
    call(override, q, k, v, {ov.FORWARD_KEY: make_state()}, skip_reshape=True)
    call(override, q, k, v, {"block_index": 0, ov.FORWARD_KEY: make_state()}, skip_reshape=True)
    assert rec.calls == []


def test_hunyuan_single_blocks_follow_the_double_blocks_and_text_is_a_suffix():
    rec = Recorder()
    override = ov.SparseAttentionOverride(rec, ov.FAMILIES["hunyuan_video"], n_double=20)
    q, k, v = qkv(2, 24 + 5, True)
    for block_type, index in [("double", 3), ("single", 2)]:
        options = {"block_index": index, "block_type": block_type, ov.FORWARD_KEY: make_state()}
        call(override, q, k, v, options, skip_reshape=True)
    assert [c["layer"] for c in rec.calls] == [3, 22]
    assert rec.calls[0]["geometry"] == VideoGeometry(2, 3, 4, suffix=5)


def test_native_grid_sizes_win_and_extra_wan_tokens_are_a_prefix():
    rec = Recorder()
    override = ov.SparseAttentionOverride(rec, ov.FAMILIES["wan"], n_double=3)
    q, k, v = qkv(1, 3 * 2 * 2 + 4, False)
    options = {"block_index": 2, "grid_sizes": (3, 2, 2), ov.FORWARD_KEY: make_state()}
    call(override, q, k, v, options)
    assert rec.calls[0]["geometry"] == VideoGeometry(3, 2, 2, prefix=4)


def test_cogvideox_counts_calls_per_forward_with_text_first():
    rec = Recorder()
    override = ov.SparseAttentionOverride(rec, ov.FAMILIES["cogvideox"], n_double=4)
    for _forward in range(2):
        state = make_state(grid=(1, 2, 3))
        for _block in range(3):
            q, k, v = qkv(2, 6 + 9, False)
            call(override, q, k, v, {ov.FORWARD_KEY: state})
    assert [c["layer"] for c in rec.calls] == [0, 1, 2, 0, 1, 2]
    assert rec.calls[0]["geometry"] == VideoGeometry(1, 2, 3, prefix=9)


def test_block_tag_patch_tags_old_versions_and_chains_an_existing_patch():
    rec = Recorder()
    override = ov.SparseAttentionOverride(rec, ov.FAMILIES["wan"], n_double=3)
    q, k, v = qkv(2, 24, False)
    base_options = {ov.FORWARD_KEY: make_state()}  # v0.3.64: no block_index in the options

    def original_block(args):
        return {"img": call(override, q, k, v, args["transformer_options"])}

    order = []

    def existing(args, extra):
        order.append(args["transformer_options"][ov.LAYER_KEY])
        return extra["original_block"](args)

    tag = ov.BlockTag(2, previous=existing)
    args = {"img": None, "transformer_options": base_options}
    out = tag(args, {"original_block": original_block})
    assert order == [2] and rec.calls[0]["layer"] == 2
    assert ov.LAYER_KEY not in base_options, "the caller's options must not be mutated"
    torch.testing.assert_close(out["img"], expected_scaled_v(v, False, False))


def test_partial_sigma_schedules_use_the_sigma_of_the_call():
    rec = Recorder()
    override = ov.SparseAttentionOverride(rec, ov.FAMILIES["wan"], n_double=1)
    q, k, v = qkv(2, 24, False)
    # KSamplerAdvanced starting at step 5 of 10 / Wan2.2 low-noise expert: only low sigmas arrive
    for sigma in (0.45, 0.2):
        options = {"block_index": 0, "sigmas": torch.tensor([sigma, sigma]),
                   ov.FORWARD_KEY: make_state(sigma=None)}
        call(override, q, k, v, options)
    assert [c["sigma"] for c in rec.calls] == pytest.approx([0.45, 0.2])


def test_bad_geometry_from_the_controller_warns_once_and_runs_dense(caplog):
    class Refusing:
        def attention(self, *a, **kw):
            raise ValueError("sequence length 24 does not match")

    override = ov.SparseAttentionOverride(Refusing(), ov.FAMILIES["wan"], n_double=1)
    q, k, v = qkv(2, 24, False)
    options = {"block_index": 0, ov.FORWARD_KEY: make_state()}
    with caplog.at_level("WARNING"):
        outs = [call(override, q, k, v, options) for _ in range(3)]
    assert all(torch.equal(o, comfy_attention(q, k, v, HEADS, _inside_attn_wrapper=True)) for o in outs)
    assert sum("dense" in r.message for r in caplog.records) == 1


def test_deepcopy_keeps_one_override_and_one_controller():
    rec = Recorder()
    override = ov.SparseAttentionOverride(rec, ov.FAMILIES["wan"], n_double=1)
    model_options = {"transformer_options": {ov.OVERRIDE_KEY: override,
                                             "patches_replace": {"dit": {("double_block", 0): ov.BlockTag(0)}}}}
    copied = copy.deepcopy(model_options)
    assert copied["transformer_options"][ov.OVERRIDE_KEY] is override
    assert copied["transformer_options"][ov.OVERRIDE_KEY].controller is rec
    assert copied["transformer_options"] is not model_options["transformer_options"]


def test_reinstall_puts_our_override_on_top_once_for_both_callback_arities():
    rec = Recorder()
    ours = ov.SparseAttentionOverride(rec, ov.FAMILIES["wan"], n_double=1)

    def other(func, q, k, v, heads, **kwargs):  # e.g. a Sage patch applied after ours
        return func(q, k, v, heads, **kwargs)

    class Patcher:
        model_options = {"transformer_options": {ov.OVERRIDE_KEY: other}}

    reinstall = ov.ReinstallOnPrepare(ours)
    reinstall(Patcher(), torch.tensor([1.0]))  # v0.3.64: (patcher, timestep)
    top = Patcher.model_options["transformer_options"][ov.OVERRIDE_KEY]
    assert isinstance(top, ov.SparseAttentionOverride) and top.previous is other and top.controller is rec
    live = {"transformer_options": {ov.OVERRIDE_KEY: other}}
    for _step in range(3):  # newer: (patcher, timestep, model_options); must not stack up
        reinstall(Patcher(), torch.tensor([1.0]), live)
    top = live["transformer_options"][ov.OVERRIDE_KEY]
    assert top.previous is other
    live = {"transformer_options": {}}
    reinstall(Patcher(), torch.tensor([1.0]), live)
    assert live["transformer_options"][ov.OVERRIDE_KEY] is ours


class _DiT:
    patch_size = (1, 2, 2)


class _Executor:
    """ComfyUI's WrapperExecutor in miniature: records the arguments the model receives."""

    class_obj = _DiT()

    def __call__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        return args[0]


def test_forward_wrapper_records_grid_and_sigma_without_touching_the_callers_options():
    executor = _Executor()
    options = {"sigmas": torch.tensor([0.9, 0.9])}
    latent = torch.zeros(2, 16, 3, 5, 8)  # odd height: padded up by the model
    ov.ForwardWrapper(ov.FAMILIES["wan"])(executor, latent, None, None, options)
    state = executor.args[-1][ov.FORWARD_KEY]
    assert state.grid == (3, 3, 4) and state.sigma == pytest.approx(0.9) and state.text is None
    assert ov.FORWARD_KEY not in options
    # Wan's time_dim_concat (5th positional argument) adds latent frames to the grid
    joined = torch.zeros(2, 16, 2, 5, 8)
    ov.ForwardWrapper(ov.FAMILIES["wan"])(executor, latent, None, None, None, joined, transformer_options=options)
    assert executor.kwargs["transformer_options"][ov.FORWARD_KEY].grid == (5, 3, 4)


def test_hunyuan_reference_tokens_go_before_the_grid_and_text_after():
    executor = _Executor()
    context = torch.zeros(1, 7, 4096)
    ov.ForwardWrapper(ov.FAMILIES["hunyuan_video"])(executor, torch.zeros(1, 16, 2, 6, 8), None, context,
                                                    {"sigmas": torch.tensor([0.5])})
    state = executor.args[-1][ov.FORWARD_KEY]
    assert state.text == 7 and state.grid == (2, 3, 4)
    rec = Recorder()
    override = ov.SparseAttentionOverride(rec, ov.FAMILIES["hunyuan_video"], n_double=1)
    q, k, v = qkv(1, 12 + 24 + 7, True)  # 12 reference-latent tokens, 24 video tokens, 7 text tokens
    call(override, q, k, v, {"block_index": 0, ov.FORWARD_KEY: state}, skip_reshape=True)
    assert rec.calls[0]["geometry"] == VideoGeometry(2, 3, 4, prefix=12, suffix=7)


def test_latent_grid_and_family_detection_reject_bad_input():
    with pytest.raises(ValueError, match="video latent"):
        ov.latent_grid((1, 16, 8, 8), (1, 2, 2))
    assert ov.latent_grid((1, 16, 5, 6, 7), 2) == (5, 3, 4)

    class UNetModel:
        pass

    class WanModel:
        pass

    class VaceWanModel(WanModel):
        pass

    with pytest.raises(ValueError, match="UNetModel"):
        ov.family_of(UNetModel())
    assert ov.family_of(VaceWanModel()).name == "wan"


def test_sparse_output_equals_the_reference_engine():
    engine_mod = pytest.importorskip("sparse_vdit.strategies.engine")
    patterns = pytest.importorskip("sparse_vdit.strategies.patterns")
    strategy_mod = pytest.importorskip("sparse_vdit.strategies.strategy")
    geom = VideoGeometry(2, 3, 4)
    layer_patterns = ((patterns.Diagonal(0.5), patterns.Skip()),)
    strategy = strategy_mod.Strategy(layers=1, heads=HEADS, sigma_edges=(1.0, 0.0),
                                     patterns=(layer_patterns,))
    engine = engine_mod.SparseEngine(strategy, force_reference=True)
    override = ov.SparseAttentionOverride(engine, ov.FAMILIES["wan"], n_double=1)
    gen = torch.Generator().manual_seed(3)
    q, k, v = qkv(2, geom.seq_len, False, gen=gen)
    out = call(override, q, k, v, {"block_index": 0, ov.FORWARD_KEY: make_state(sigma=0.5)})
    dense = lambda *a: pytest.fail("sparse layer must not run dense")  # noqa: E731
    ref = engine_mod.SparseEngine(strategy, force_reference=True).attention(
        *(t.view(2, geom.seq_len, HEADS, HEAD_DIM) for t in (q, k, v)), layer=0, sigma=0.5,
        geometry=geom, layout="blhd", dense=dense)
    torch.testing.assert_close(out, ref.reshape(2, geom.seq_len, HEADS * HEAD_DIM))
    assert torch.count_nonzero(out.view(2, -1, HEADS, HEAD_DIM)[:, :, 1]) == 0  # the skip head


def test_non_contiguous_inputs_are_accepted():
    rec = Recorder()
    override = ov.SparseAttentionOverride(rec, ov.FAMILIES["wan"], n_double=1)
    q, k, v = (torch.randn(2, HEADS * HEAD_DIM, 24).transpose(1, 2) for _ in range(3))
    assert not v.is_contiguous()
    out = call(override, q, k, v, {"block_index": 0, ov.FORWARD_KEY: make_state()})
    torch.testing.assert_close(out, expected_scaled_v(v.contiguous(), False, False))


def test_triton_route_under_inference_mode_like_comfyui_sampling():
    """ComfyUI samples under torch.inference_mode: plans compiled there must work on the Triton path
    (TRITON_INTERPRET on CPU, fp32)."""
    if torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton interpreter on CPU")
    pytest.importorskip("triton")
    from sparse_vdit.strategies.engine import SparseEngine
    from sparse_vdit.strategies.patterns import Diagonal, Skip
    from sparse_vdit.strategies.strategy import Strategy

    # a pattern and grid no other test uses: plans are cached process-wide, and one compiled
    # outside inference mode would hide the failure
    strategy = Strategy(layers=1, heads=HEADS, sigma_edges=(1.0, 0.0), patterns=(((Diagonal(0.4375), Skip()),),))
    override = ov.SparseAttentionOverride(SparseEngine(strategy), ov.FAMILIES["wan"], n_double=1)
    q, k, v = qkv(1, 30, True, gen=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = call(override, q, k, v, {"block_index": 0, ov.FORWARD_KEY: make_state(grid=(3, 2, 5))},
                   skip_reshape=True)
    ref = SparseEngine(strategy, force_reference=True, backend="reference").attention(
        q, k, v, layer=0, sigma=0.7, geometry=VideoGeometry(3, 2, 5), layout="bhld", dense=None)
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(1, 30, HEADS * HEAD_DIM), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("skip_reshape", [False, True])
def test_dense_heads_of_a_mixed_layer_go_through_the_comfy_chain(skip_reshape):
    """On the Triton route a mixed layer's Dense heads run through ComfyUI's attention function
    (the chain) with only those heads; the result equals the reference engine (float64 oracle)."""
    if torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton interpreter on CPU")
    pytest.importorskip("triton")
    from sparse_vdit.strategies.engine import SparseEngine
    from sparse_vdit.strategies.patterns import Dense, Diagonal
    from sparse_vdit.strategies.strategy import Strategy

    geom = VideoGeometry(3, 2, 5)
    strategy = Strategy(layers=1, heads=HEADS, sigma_edges=(1.0, 0.0), patterns=(((Dense(), Diagonal(0.5)),),))
    override = ov.SparseAttentionOverride(SparseEngine(strategy), ov.FAMILIES["wan"], n_double=1)
    q, k, v = qkv(2, geom.seq_len, skip_reshape, gen=torch.Generator().manual_seed(5))
    before = comfy_attention.calls
    out = call(override, q, k, v, {"block_index": 0, ov.FORWARD_KEY: make_state(grid=(3, 2, 5))},
               skip_reshape=skip_reshape)
    assert comfy_attention.calls == before + 1  # one dense call, for the one Dense head
    as_blhd = (lambda t: t.transpose(1, 2)) if skip_reshape else (lambda t: t.view(2, geom.seq_len, HEADS, HEAD_DIM))
    ref = SparseEngine(strategy, force_reference=True, backend="reference").attention(
        *(as_blhd(t) for t in (q, k, v)), layer=0, sigma=0.7, geometry=geom, layout="blhd", dense=None)
    got = out.view(2, geom.seq_len, HEADS, HEAD_DIM)  # ComfyUI form [B, L, H * D] comes back
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
