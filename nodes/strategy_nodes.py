"""V3 nodes around a strategy: Apply (native MODEL), Load, Save, Retarget, Info."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..strategies.file import searched_geometry
from ..strategies.geometry import VideoGeometry
from . import patch, strategy_store, strategy_view
from .sockets import CATEGORY, Strategy


def _geometry(strategy, frames: int, height: int, width: int) -> VideoGeometry:
    """The grid given on the node, or the one the strategy was searched at when left at 0."""
    if frames and height and width:
        return VideoGeometry(frames, height, width)
    searched = searched_geometry(strategy)
    if searched is None:
        raise ValueError("this strategy file records no searched size: set frames, height and width "
                         "(latent patches, e.g. 21 x 30 x 52 for Wan 81 frames at 480x832)")
    return searched


def _this_device() -> str:
    import comfy.model_management as mm

    return str(mm.get_torch_device())


class ApplyStrategy(io.ComfyNode):
    """MODEL + strategy -> MODEL whose self-attention runs the strategy's sparse patterns."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseVDiTApplyStrategy",
            display_name="Apply Sparse Strategy",
            category=CATEGORY,
            description="Patch a Wan2.x / HunyuanVideo / CogVideoX MODEL (a clone; the input is "
                        "unchanged) with searched per-head sparse attention.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (from Load Diffusion Model, "
                               "after any LoRA / attention-backend nodes)."),
                Strategy.Input("strategy", tooltip="A strategy from Load Strategy, Search or Retarget; "
                               "it must match the model's layer and head count."),
                io.Boolean.Input("force_reference", default=False,
                                 tooltip="Run the slow pure-torch reference kernel even without a CUDA "
                                 "GPU (for tests); off: non-CUDA devices run dense attention."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, strategy, force_reference=False):
        return io.NodeOutput(patch.apply_strategy(model, strategy, force_reference=force_reference))


class LoadStrategy(io.ComfyNode):
    """A strategy file from models/sparse_strategies; re-read when the file changes."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseVDiTLoadStrategy",
            display_name="Load Sparse Strategy",
            category=CATEGORY,
            description="Load a .safetensors strategy from models/sparse_strategies.",
            inputs=[io.Combo.Input("strategy_name", options=strategy_store.strategy_names(),
                                   tooltip="A file in models/sparse_strategies (written by Search or "
                                   "Save Strategy, or downloaded).")],
            outputs=[Strategy.Output(display_name="strategy"), io.String.Output(display_name="info")],
        )

    @classmethod
    def fingerprint_inputs(cls, strategy_name):
        return strategy_store.fingerprint(strategy_name)

    @classmethod
    def execute(cls, strategy_name):
        strategy = strategy_store.load(strategy_name)
        info = f"{strategy_name}: {strategy.layers} layers x {strategy.heads} heads, " \
               f"{len(strategy.patterns)} sigma buckets"
        return io.NodeOutput(strategy, info, ui=ui.PreviewText(info))


class SaveStrategy(io.ComfyNode):
    """Write a strategy into models/sparse_strategies under a new numbered name."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseVDiTSaveStrategy",
            display_name="Save Sparse Strategy",
            category=CATEGORY,
            description="Save a strategy (with its search record, so it can be retargeted later).",
            inputs=[
                Strategy.Input("strategy", tooltip="The strategy to save."),
                io.String.Input("filename_prefix", default="sparse_vdit/strategy",
                                tooltip="Name inside models/sparse_strategies; '/' makes sub-folders; "
                                "a counter and .safetensors are appended."),
            ],
            outputs=[io.String.Output(display_name="strategy_name")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, strategy, filename_prefix):
        name = strategy_store.save(strategy, filename_prefix)
        return io.NodeOutput(name, ui=ui.PreviewText(f"saved models/{strategy_store.FOLDER}/{name}"))


class RetargetStrategy(io.ComfyNode):
    """A new strategy from a searched one's stored error table: new budget and/or this GPU."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseVDiTRetargetStrategy",
            display_name="Retarget Sparse Strategy",
            category=CATEGORY,
            description="Re-select patterns from the stored search record (no new search, < 1 s).",
            inputs=[
                Strategy.Input("strategy", tooltip="A searched strategy (its file keeps the error table)."),
                io.Combo.Input("budget", options=["target speedup", "error budget"],
                               tooltip="Aim for an attention speedup, or for a total error."),
                io.Float.Input("value", default=2.0, min=0.0, max=1000.0, step=0.01,
                               tooltip="The target attention speedup (e.g. 2.0) or the error budget."),
                io.Boolean.Input("this_gpu", default=True,
                                 tooltip="Re-measure pattern costs on this GPU; off: keep the costs "
                                 "measured where the search ran."),
            ],
            outputs=[Strategy.Output(display_name="strategy"), io.String.Output(display_name="info")],
        )

    @classmethod
    def execute(cls, strategy, budget, value, this_gpu=True):
        from ..strategies.cost import CostModel
        from ..strategies.select import reselect

        if value <= 0:
            raise ValueError(f"the {budget} must be > 0, got {value}")
        cost = None
        if this_gpu:
            head_dim = int(((strategy.meta or {}).get("model") or {}).get("head_dim", 128))
            cost = CostModel(geometry=_geometry(strategy, 0, 0, 0), heads=strategy.heads,
                             head_dim=head_dim, device=_this_device())
        kwargs = {"target_speedup": value} if budget == "target speedup" else {"error_budget": value}
        new = reselect(strategy, cost=cost, **kwargs)
        search = new.meta.get("search") or {}
        info = (f"predicted attention speedup {search.get('predicted_speedup', float('nan')):.2f}x, "
                f"predicted error {search.get('predicted_error', float('nan')):.4g}")
        return io.NodeOutput(new, info, ui=ui.PreviewText(info))


class StrategyInfo(io.ComfyNode):
    """An IMAGE of the strategy (heads x layers by mode, density per layer) and a text summary."""

    @classmethod
    def define_schema(cls):
        grid_tip = "latent patches; 0 = the size the strategy was searched at"
        return io.Schema(
            node_id="SparseVDiTStrategyInfo",
            display_name="Sparse Strategy Info",
            category=CATEGORY,
            description="Show which pattern every head uses, per sigma bucket, and the predicted "
                        "speedup on this machine.",
            inputs=[
                Strategy.Input("strategy", tooltip="The strategy to describe."),
                io.Int.Input("frames", default=0, min=0, max=4096, tooltip=f"Grid frames ({grid_tip})."),
                io.Int.Input("height", default=0, min=0, max=4096, tooltip=f"Grid rows ({grid_tip})."),
                io.Int.Input("width", default=0, min=0, max=4096, tooltip=f"Grid columns ({grid_tip})."),
            ],
            outputs=[io.Image.Output(display_name="image"), io.String.Output(display_name="summary")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, strategy, frames=0, height=0, width=0):
        geometry = _geometry(strategy, frames, height, width)
        data = strategy_view.view_data(strategy, geometry)
        speedup = strategy_view.predicted_speedup(strategy, geometry, _this_device())
        text = strategy_view.describe(strategy, data, speedup)
        image = strategy_view.render_view(data)
        return io.NodeOutput(image, text, ui=ui.PreviewText(text))


NODES = [ApplyStrategy, LoadStrategy, SaveStrategy, RetargetStrategy, StrategyInfo]
