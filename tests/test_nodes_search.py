"""The Search node on the ModelPatcher and sampler stand-ins: progress, cancel/resume, file, dense latent."""

import pytest
import torch

from test_comfy_override_patch import Patcher, WanModel
from test_nodes import Interrupted, comfy  # noqa: F401  (comfy: fixture)


@pytest.fixture
def sampler(comfy):  # noqa: F811
    return comfy.run


def run_search(**overrides):
    from sparse_vdit.nodes import search_node, strategy_store

    strategy_store.register_folder()
    model = Patcher(WanModel())
    latent = {"samples": torch.zeros(1, 4, 2, 6, 8)}
    args = dict(model=model, positive=[], negative=[], latent=latent, seed=3, steps=3, cfg=5.0,
                sampler_name="euler", scheduler="simple", budget="target speedup", value=1.5,
                filename_prefix="tests/wan", resume=True)
    args.update(overrides)
    return search_node.SearchStrategy.execute(**args)


def test_search_writes_a_loadable_strategy_and_returns_the_dense_latent(sampler):
    out = run_search()
    strategy, dense, info = out.values
    assert strategy.layers == 3 and strategy.heads == 2
    assert "saved models/sparse_strategies/tests/wan_00001.safetensors" in info
    assert dense["samples"].shape == (1, 4, 2, 6, 8)
    assert sampler.forwards == 6  # dense pass + closed pass, 3 steps each
    assert sampler.progress[-1] == (6, 6) and [p[0] for p in sampler.progress] == sorted(p[0] for p in sampler.progress)
    from sparse_vdit.nodes import strategy_store

    loaded = strategy_store.load("tests/wan_00001.safetensors")
    assert loaded.patterns == strategy.patterns and loaded.meta["model"]["family"] == "wan"


def test_cancel_raises_comfys_interrupt_and_resume_finishes(sampler):
    sampler.interrupt_after = 2
    with pytest.raises(Interrupted):
        run_search()
    done_before = sampler.forwards
    assert done_before < 6
    sampler.interrupt_after = None
    strategy, dense, _info = run_search().values
    assert strategy.layers == 3
    assert dense["samples"].abs().sum() > 0


def test_search_rejects_a_non_video_model_and_a_bad_budget(sampler):
    class UNetModel(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="UNetModel"):
        run_search(model=Patcher(UNetModel()))
    with pytest.raises(ValueError, match="must be > 0"):
        run_search(value=0.0)


def test_step_tracker_begins_each_step_once_including_second_order_evaluations():
    from sparse_vdit.nodes.step_tracker import StepTracker

    class Controller:
        def __init__(self):
            self.steps, self.layers = [], []

        def begin_step(self, sigma, step):
            self.steps.append(step)

        def attention(self, q, k, v, *, layer, sigma, **kw):
            self.layers.append(layer)
            return q

    for sigmas in ([1.0, 0.6, 0.6, 0.3, 0.3],      # heun: 2nd evaluation at the next sigma
                   [1.0, 0.77, 0.6, 0.42, 0.3]):  # dpm_2: 2nd evaluation in between
        ctl = Controller()
        tracker = StepTracker(ctl, [1.0, 0.6, 0.3])
        for sigma in sigmas:
            tracker.attention(None, None, None, layer=0, sigma=sigma)
        assert ctl.steps == [0, 1, 2] and len(ctl.layers) == 5
    assert tracker.step_of(0.6000001) == 1 and tracker.step_of(5.0) == 0 and tracker.step_of(0.0) == 2
    for bad in ([], [0.5, 0.7], [1.0, 1.0]):
        with pytest.raises(ValueError, match="strictly descending"):
            StepTracker(ctl, bad)


def test_retarget_reselects_a_searched_strategy_without_a_new_search(sampler):
    from sparse_vdit.nodes import strategy_nodes

    strategy = run_search().values[0]
    forwards = sampler.forwards
    for this_gpu in (False, True):
        cheap, info = strategy_nodes.RetargetStrategy.execute(strategy, "target speedup", 4.0, this_gpu).values
        assert cheap.layers == strategy.layers and "predicted attention speedup" in info
        assert cheap.meta["search"]["target_speedup"] == 4.0
    budget = strategy_nodes.RetargetStrategy.execute(strategy, "error budget", 0.5, False).values[0]
    assert budget.meta["search"]["error_budget"] == 0.5
    assert sampler.forwards == forwards, "retargeting must not sample"
    with pytest.raises(ValueError, match="must be > 0"):
        strategy_nodes.RetargetStrategy.execute(strategy, "target speedup", 0.0, False)
    from test_nodes import tiny_strategy

    with pytest.raises(ValueError, match="no stored error table"):
        strategy_nodes.RetargetStrategy.execute(tiny_strategy(), "target speedup", 2.0, False)
