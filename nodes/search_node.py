"""V3 node: search a strategy by calibrating through ComfyUI's own sampler on a native MODEL.

Two sampling passes run with the search's deciding controller installed (dense, then closed
loop); progress goes to the node's bar, Cancel stops it (the partial state is kept so the next
run with ``resume`` continues), the strategy is written to models/sparse_strategies.
"""

from __future__ import annotations

import os

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
from comfy_api.latest import io, ui

from ..strategies.file import model_fingerprint
from ..strategies.search import SearchCancelled, SearchSettings, search
from . import patch, strategy_store
from .sockets import CATEGORY, Strategy
from .step_tracker import StepTracker


def sample_native(model, latent: dict, *, seed, steps, cfg, sampler_name, scheduler, positive, negative):
    """ComfyUI's KSampler without its preview/progress: the denoised latent tensor."""
    image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(image, seed, latent.get("batch_index"))
    return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, image,
                               noise_mask=latent.get("noise_mask"), disable_pbar=True, seed=seed)


def _fingerprint(model) -> dict:
    family, n_double, n_single, heads = patch.model_layout(model)
    dm = model.get_model_object("diffusion_model")
    width = getattr(dm, "dim", None) or getattr(dm, "hidden_size", None)
    head_dim = width // heads if width and heads else 128
    return model_fingerprint(dm, layers=n_double + n_single, heads=heads or 0, head_dim=head_dim,
                             family=family.name)


class SearchStrategy(io.ComfyNode):
    """MODEL + prompt + latent -> a searched strategy and the dense latent (for Compare)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseVDiTSearch",
            display_name="Search Sparse Strategy",
            category=CATEGORY,
            description="Find per-head sparse patterns for this model and size: samples twice "
                        "(dense, then closed loop) and keeps the cheapest patterns within the budget.",
            inputs=[
                io.Model.Input("model", tooltip="The native Wan2.x / HunyuanVideo MODEL to calibrate."),
                io.Conditioning.Input("positive", tooltip="Calibration prompt (patterns depend little on it)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt, as in your KSampler."),
                io.Latent.Input("latent", tooltip="Empty video latent at the size you will generate."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Noise seed."),
                io.Int.Input("steps", default=30, min=1, max=1000,
                             tooltip="Sampling steps (use the count you will generate with)."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, tooltip="CFG scale."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS),
                               default="uni_pc", tooltip="Sampler, as in your KSampler."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS),
                               default="simple", tooltip="Scheduler, as in your KSampler."),
                *search_budget_inputs(),
            ],
            outputs=search_outputs(),
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler,
                budget, value, filename_prefix, resume=True):
        _family, n_double, n_single, _heads = patch.model_layout(model)  # unsupported -> clear error
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
        schedule = [float(s) for s in sigmas[:-1]]

        def sample(sampling_model):
            return sample_native(sampling_model, latent, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                                 scheduler=scheduler, positive=positive, negative=negative)

        def run(controller):
            return sample(patch.install_controller(model, StepTracker(controller, schedule)))

        meta = {"model": _fingerprint(model),
                "schedule": {"sampler": sampler_name, "scheduler": scheduler, "steps": steps, "cfg": cfg}}
        result, name = search_and_save(run, schedule, n_double + n_single, budget=budget, value=value, seed=seed,
                                       filename_prefix=filename_prefix, resume=resume, meta=meta)
        # a resumed search skipped the dense pass: sample the dense latent once more
        dense_samples = result.dense_latents if result.dense_latents is not None else sample(model)
        info = (f"saved models/{strategy_store.FOLDER}/{name}: predicted attention speedup "
                f"{result.selection.predicted_speedup:.2f}x, predicted error {result.selection.predicted_error:.4g}")
        return io.NodeOutput(result.strategy, dict(latent, samples=dense_samples), info, ui=ui.PreviewText(info))


def search_budget_inputs() -> list:
    """The inputs every search node shares: budget kind and value, output file, resume."""
    return [
        io.Combo.Input("budget", options=["target speedup", "error budget"],
                       tooltip="Aim for an attention speedup, or for a total error."),
        io.Float.Input("value", default=2.0, min=0.0, max=1000.0, step=0.01,
                       tooltip="The target attention speedup (e.g. 2.0) or the error budget."),
        io.String.Input("filename_prefix", default="sparse_vdit/search",
                        tooltip="Name of the strategy file inside models/sparse_strategies."),
        io.Boolean.Input("resume", default=True,
                         tooltip="Continue a cancelled search with the same settings; off: start over."),
    ]


def search_outputs() -> list:
    """The outputs every search node shares: the strategy, the dense latent, a summary line."""
    return [Strategy.Output(display_name="strategy"), io.Latent.Output(display_name="dense_latent"),
            io.String.Output(display_name="info")]


def search_and_save(run, schedule, layers: int, *, budget: str, value: float, seed: int, filename_prefix: str,
                    resume: bool, meta: dict):
    """Run the search with ComfyUI's progress bar and Cancel, save the strategy; (result, file name).

    ``run(controller)`` samples once with the controller at the call sites; a cancelled search
    keeps its state next to the strategies and continues on the next call when ``resume``.
    """
    if value <= 0:
        raise ValueError(f"the {budget} must be > 0, got {value}")
    budget_kw = {"target_speedup": value} if budget == "target speedup" else \
        {"target_speedup": None, "error_budget": value}
    settings = SearchSettings(**budget_kw, seed=seed)
    state_path = strategy_store.search_state_path(filename_prefix)
    if not resume and os.path.exists(state_path):
        os.remove(state_path)
    bar = comfy.utils.ProgressBar(2 * len(schedule))
    try:
        result = search(run, sigmas=schedule, layers=layers, settings=settings,
                        progress=lambda done, total: bar.update_absolute(done, total),
                        cancel=mm.processing_interrupted, state_path=state_path, meta=meta)
    except SearchCancelled:
        mm.throw_exception_if_processing_interrupted()
        raise
    name = strategy_store.save(result.strategy, filename_prefix)
    if os.path.exists(state_path):
        os.remove(state_path)
    return result, name


NODES = [SearchStrategy]
