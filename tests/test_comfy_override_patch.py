"""install_controller / apply_strategy on a stand-in ModelPatcher that behaves like ComfyUI's.

The stand-in reproduces only what the patch relies on: clone() deep-copies model_options,
wrappers/callbacks are per-patcher lists, set_model_patch_replace writes
transformer_options["patches_replace"][name][(kind, i)], and a forward runs the DIFFUSION_MODEL
wrappers, then each block through its dit patch, with attention routed through the override
the way ComfyUI's wrap_attn does.
"""

import copy
import functools
import sys
import types

import pytest
import torch

from sparse_vdit.nodes import override as ov
from test_comfy_override import HEADS, HEAD_DIM, Recorder, comfy_attention


@pytest.fixture
def comfy_hooks(monkeypatch):
    """A stand-in comfy.patcher_extension with ComfyUI's hook names."""
    ext = types.ModuleType("comfy.patcher_extension")
    ext.WrappersMP = types.SimpleNamespace(DIFFUSION_MODEL="diffusion_model")
    ext.CallbacksMP = types.SimpleNamespace(ON_PREPARE_STATE="on_prepare_state")
    comfy = types.ModuleType("comfy")
    comfy.patcher_extension = ext
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.patcher_extension", ext)
    from sparse_vdit.nodes import patch

    return patch


class WanModel(torch.nn.Module):
    """Tiny Wan-like DiT: 3 blocks, self-attention on video tokens, cross-attention to text."""

    patch_size = (1, 2, 2)
    num_heads = HEADS

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(3))

    def forward_blocks(self, x, options):
        text = torch.randn(x.shape[0], 5, HEADS * HEAD_DIM)
        outs = []
        for i, _block in enumerate(self.blocks):
            def block(args, i=i):
                to = args["transformer_options"]
                self_out = attention(x, x, x, to)
                cross = attention(x, text, text, to)
                return {"img": self_out + cross}
            patch = options.get("patches_replace", {}).get("dit", {}).get(("double_block", i))
            outs.append(patch({"img": x, "transformer_options": options}, {"original_block": block})["img"]
                        if patch else block({"transformer_options": options})["img"])
        return outs


def attention(q, k, v, options):
    """ComfyUI's wrap_attn in miniature: the override, if any, gets the original function."""
    override = options.get(ov.OVERRIDE_KEY)
    if override is not None:
        return override(comfy_attention, q, k, v, HEADS, transformer_options=options, _inside_attn_wrapper=True)
    return comfy_attention(q, k, v, HEADS, transformer_options=options, _inside_attn_wrapper=True)


class Patcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.wrappers, self.callbacks = {}, {}

    def clone(self):
        n = Patcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {t: {k: list(v) for k, v in d.items()} for t, d in self.wrappers.items()}
        n.callbacks = {t: {k: list(v) for k, v in d.items()} for t, d in self.callbacks.items()}
        return n

    def get_model_object(self, name):
        return {"diffusion_model": self.model, "model_sampling": None}[name]

    def add_wrapper_with_key(self, kind, key, fn):
        self.wrappers.setdefault(kind, {}).setdefault(key, []).append(fn)

    def remove_wrappers_with_key(self, kind, key):
        self.wrappers.get(kind, {}).pop(key, None)

    def add_callback_with_key(self, kind, key, fn):
        self.callbacks.setdefault(kind, {}).setdefault(key, []).append(fn)

    def remove_callbacks_with_key(self, kind, key):
        self.callbacks.get(kind, {}).pop(key, None)

    def set_model_patch_replace(self, fn, name, kind, index):
        to = self.model_options["transformer_options"]
        to.setdefault("patches_replace", {}).setdefault(name, {})[(kind, index)] = fn

    def forward(self, latent, sigma):
        """One sampling step: per-step callbacks, a fresh merged options dict, wrappers, blocks."""
        options = dict(self.model_options["transformer_options"])
        options["sigmas"] = torch.tensor([sigma] * latent.shape[0])
        for fns in self.callbacks.get("on_prepare_state", {}).values():
            for fn in fns:
                fn(self, options["sigmas"], {"transformer_options": options})
        dm = self.model
        grid = ov.latent_grid(tuple(latent.shape), dm.patch_size)
        x = torch.randn(latent.shape[0], grid[0] * grid[1] * grid[2], HEADS * HEAD_DIM)

        wrappers = [w for fns in self.wrappers.get("diffusion_model", {}).values() for w in fns]
        run = lambda latent, options: dm.forward_blocks(x, options)  # noqa: E731
        for w in reversed(wrappers):
            run = functools.partial(w, _Executor(run, dm))
        return run(latent, options)


class _Executor:
    """ComfyUI's WrapperExecutor in miniature: callable, with the DiT as class_obj."""

    def __init__(self, inner, dm):
        self.inner, self.class_obj = inner, dm

    def __call__(self, *a, **kw):
        return self.inner(*a, **kw)


def test_clone_is_patched_and_the_base_model_is_not(comfy_hooks):
    base = Patcher(WanModel())
    rec = Recorder()
    patched = comfy_hooks.install_controller(base, rec)
    assert base.model_options == {"transformer_options": {}} and base.wrappers == {}
    latent = torch.zeros(2, 16, 2, 6, 8)
    base.forward(latent, 0.8)
    assert rec.calls == []
    patched.forward(latent, 0.8)
    # one sparse call per block (self-attention); cross-attention stayed dense
    assert [c["layer"] for c in rec.calls] == [0, 1, 2]
    assert all(c["geometry"].grid_tokens == 2 * 3 * 4 and c["sigma"] == pytest.approx(0.8) for c in rec.calls)


def test_existing_override_is_chained_and_reinstalled_on_top(comfy_hooks):
    base = Patcher(WanModel())
    sage_calls = []

    def sage(func, q, k, v, heads, **kwargs):
        sage_calls.append(q.shape[1] != k.shape[1])
        return func(q, k, v, heads, **kwargs)

    base.model_options["transformer_options"][ov.OVERRIDE_KEY] = sage
    rec = Recorder()
    patched = comfy_hooks.install_controller(base, rec)
    later = patched.clone()  # a node applied after ours replaces the override
    later.model_options["transformer_options"][ov.OVERRIDE_KEY] = sage
    later.forward(torch.zeros(2, 16, 2, 6, 8), 0.5)
    assert len(rec.calls) == 3, "ON_PREPARE_STATE must put our override back on top"
    assert sage_calls == [True] * 3, "cross-attention goes to the chained override"


def test_applying_twice_replaces_our_tags_and_wrapper(comfy_hooks):
    base = Patcher(WanModel())
    first = comfy_hooks.install_controller(base, Recorder())
    rec = Recorder()
    second = comfy_hooks.install_controller(first, rec)
    assert len(second.wrappers["diffusion_model"][ov.WRAPPER_KEY]) == 1
    tag = second.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 1)]
    assert isinstance(tag, ov.BlockTag) and tag.previous is None
    second.forward(torch.zeros(1, 16, 1, 4, 4), 0.3)
    assert [c["layer"] for c in rec.calls] == [0, 1, 2]


def test_strategy_of_another_size_is_refused_with_both_sizes(comfy_hooks):
    strategy = types.SimpleNamespace(layers=40, heads=40)
    with pytest.raises(ValueError, match="40 layers x 40 heads.*3 layers x 2 heads"):
        comfy_hooks.check_strategy_fits(strategy, Patcher(WanModel()))


class NewerWanModel(WanModel):
    """Like newer ComfyUI's Wan: the block loop itself tags transformer_options."""

    def forward_orig(self, x, transformer_options):
        for i, block in enumerate(self.blocks):
            transformer_options["block_index"] = i
        return x


def test_no_block_tags_where_the_model_sets_block_index(comfy_hooks):
    assert ov.sets_block_index(NewerWanModel()) and not ov.sets_block_index(WanModel())
    patched = comfy_hooks.install_controller(Patcher(NewerWanModel()), Recorder())
    assert "patches_replace" not in patched.model_options["transformer_options"]
    tagged = comfy_hooks.install_controller(Patcher(WanModel()), Recorder())
    assert len(tagged.model_options["transformer_options"]["patches_replace"]["dit"]) == 3
