"""Node schemas and node logic without ComfyUI: a small stand-in for comfy_api.latest,
comfy and folder_paths is put in sys.modules for the tests that need it.

The stand-in records what our schemas declare (ids, types, tooltips) so the tests can check
them, and what nodes return (NodeOutput values, ui).
"""

import asyncio
import os
import sys
import types

import pytest
import torch

NODE_MODULES = ("sockets", "strategy_nodes", "compare_node", "extension", "search_node",
                "diffusers_nodes", "routes", "strategy_store", "patch")


# ----------------------------------------------------------------------------- the stand-in


class Port:
    """A declared input or output: its socket type, id and options."""

    def __init__(self, io_type, id=None, **options):
        self.io_type, self.id, self.options = io_type, id, options


def comfy_type(io_type):
    return type(io_type, (), {
        "io_type": io_type,
        "Input": staticmethod(lambda id, **kw: Port(io_type, id, **kw)),
        "Output": staticmethod(lambda id=None, **kw: Port(io_type, id, **kw)),
    })


class Schema:
    def __init__(self, node_id, display_name=None, category="sd", inputs=None, outputs=None,
                 hidden=None, description="", is_output_node=False, not_idempotent=False, **extra):
        self.node_id, self.display_name, self.category = node_id, display_name, category
        self.inputs, self.outputs, self.hidden = inputs or [], outputs or [], hidden or []
        self.description, self.is_output_node, self.not_idempotent = description, is_output_node, not_idempotent


class NodeOutput:
    def __init__(self, *values, ui=None, **extra):
        self.values, self.ui = values, ui


def fake_io():
    io = types.ModuleType("comfy_api.latest.io")
    io.Schema, io.NodeOutput = Schema, NodeOutput
    io.ComfyNode = type("ComfyNode", (), {})
    io.Custom = comfy_type
    for name, io_type in [("Model", "MODEL"), ("Latent", "LATENT"), ("Image", "IMAGE"),
                          ("Conditioning", "CONDITIONING"), ("Vae", "VAE"), ("Int", "INT"),
                          ("Float", "FLOAT"), ("String", "STRING"), ("Boolean", "BOOLEAN"),
                          ("Combo", "COMBO")]:
        setattr(io, name, comfy_type(io_type))
    io.Hidden = types.SimpleNamespace(unique_id="UNIQUE_ID")
    return io


class Interrupted(Exception):
    """Stands for comfy.model_management.InterruptProcessingException."""


def comfy_runtime(run):
    """Stand-ins for comfy.model_management / sample / samplers / utils / patcher_extension.

    The sampler is a plain Euler loop over ``model.forward(latent, sigma)`` (the ModelPatcher
    stand-in of test_comfy_override_patch); progress and interrupts are recorded in ``run``.
    """
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = mm.unet_offload_device = mm.intermediate_device = lambda: torch.device("cpu")
    mm.free_memory = lambda memory_required, device: None
    mm.soft_empty_cache = lambda: None
    mm.processing_interrupted = lambda: run.interrupted

    def throw_if_interrupted():
        if run.interrupted:
            run.interrupted = False
            raise Interrupted("Processing interrupted")

    mm.throw_exception_if_processing_interrupted = throw_if_interrupted
    samplers = types.ModuleType("comfy.samplers")
    samplers.KSampler = types.SimpleNamespace(SAMPLERS=["euler", "uni_pc"], SCHEDULERS=["simple"])
    samplers.calculate_sigmas = lambda model_sampling, scheduler, steps: torch.linspace(1.0, 0.0, steps + 1)
    sample = types.ModuleType("comfy.sample")
    sample.fix_empty_latent_channels = lambda model, x: x
    sample.prepare_noise = lambda x, seed, index=None: torch.randn(
        x.shape, generator=torch.Generator().manual_seed(seed))

    def euler(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, image, **kw):
        x = noise.clone()
        sigmas = samplers.calculate_sigmas(None, scheduler, steps)
        for i in range(steps):
            outs = model.forward(x, float(sigmas[i]))
            run.forwards += 1
            x = x - (sigmas[i] - sigmas[i + 1]) * torch.stack([o.mean() for o in outs]).sum()
        return x

    sample.sample = euler
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None):
            run.progress.append((value, total or self.total))
            if run.interrupt_after is not None and value >= run.interrupt_after:
                run.interrupted = True

    utils.ProgressBar = ProgressBar
    ext = types.ModuleType("comfy.patcher_extension")
    ext.WrappersMP = types.SimpleNamespace(DIFFUSION_MODEL="diffusion_model")
    ext.CallbacksMP = types.SimpleNamespace(ON_PREPARE_STATE="on_prepare_state")
    return {"comfy": types.ModuleType("comfy"), "comfy.model_management": mm, "comfy.samplers": samplers,
            "comfy.sample": sample, "comfy.utils": utils, "comfy.patcher_extension": ext}


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    """Stand-ins for comfy_api.latest, comfy and folder_paths (models dir under tmp_path)."""
    latest = types.ModuleType("comfy_api.latest")
    latest.io = fake_io()
    latest.ui = types.SimpleNamespace(PreviewText=lambda value, **kw: {"text": [value]},
                                      PreviewImage=lambda image, **kw: {"images": image})
    latest.ComfyExtension = type("ComfyExtension", (), {})
    attention = types.ModuleType("comfy.ldm.modules.attention")
    attention.wrap_attn = lambda f: f
    run = types.SimpleNamespace(progress=[], interrupt_after=None, interrupted=False, forwards=0)
    comfy_modules = comfy_runtime(run)
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.folder_names_and_paths = {
        kind: ([str(tmp_path / "models" / kind)], exts)
        for kind, exts in [("diffusion_models", {".safetensors"}), ("vae", {".safetensors"}), ("diffusers", {"folder"})]}

    def folder(name):
        return fp.folder_names_and_paths[name][0]

    def names(name):
        out = []
        for root in folder(name):
            for dirpath, _dirs, files in os.walk(root):
                out += [os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
                        for f in files if os.path.splitext(f)[1] in fp.folder_names_and_paths[name][1]]
        return sorted(out)

    def full_path(name, filename):
        for root in folder(name):
            path = os.path.join(root, filename)
            if os.path.isfile(path):
                return path
        return None

    fp.get_folder_paths, fp.get_filename_list, fp.get_full_path = folder, names, full_path
    modules = {"comfy_api": types.ModuleType("comfy_api"), "comfy_api.latest": latest,
               "comfy.ldm": types.ModuleType("comfy.ldm"),
               "comfy.ldm.modules": types.ModuleType("comfy.ldm.modules"),
               "comfy.ldm.modules.attention": attention, "folder_paths": fp, **comfy_modules}
    modules["comfy.ldm.modules"].attention = attention
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
        if name.startswith("comfy.") and name.count(".") == 1:
            setattr(modules["comfy"], name.split(".")[1], module)
    import sparse_vdit.nodes as package

    for name in NODE_MODULES:  # node modules bind comfy at import: re-import them in each test
        monkeypatch.delitem(sys.modules, f"sparse_vdit.nodes.{name}", raising=False)
        monkeypatch.delattr(package, name, raising=False)
    yield types.SimpleNamespace(fp=fp, attention=attention, latest=latest, run=run)
    for name in NODE_MODULES:
        sys.modules.pop(f"sparse_vdit.nodes.{name}", None)
        if hasattr(package, name):
            delattr(package, name)


def extension_nodes(comfy):
    from sparse_vdit.nodes import extension

    ext = asyncio.run(extension.make_extension())
    return asyncio.run(ext.get_node_list())


def tiny_strategy(layers=2, heads=2, searched=True):
    from sparse_vdit.strategies.patterns import Dense, Diagonal, Skip
    from sparse_vdit.strategies.strategy import Strategy

    cycle = (Diagonal(0.5), Skip(), Dense())  # head h of layer l uses cycle[(l + h) % 3]
    layer_rows = tuple(tuple(cycle[(l + h) % 3] for h in range(heads)) for l in range(layers))
    meta = {"geometry": {"frames": 2, "height": 3, "width": 4, "prefix": 0, "suffix": 0}} if searched else {}
    return Strategy(layers=layers, heads=heads, sigma_edges=(1.0, 0.5, 0.0),
                    patterns=(layer_rows, layer_rows), meta=meta)


# ----------------------------------------------------------------------------- schemas


def test_every_node_is_prefixed_categorised_and_has_tooltips(comfy):
    nodes = extension_nodes(comfy)
    schemas = [n.define_schema() for n in nodes]
    ids = [s.node_id for s in schemas]
    assert len(set(ids)) == len(ids)
    assert {"SparseVDiTApplyStrategy", "SparseVDiTLoadStrategy", "SparseVDiTSaveStrategy",
            "SparseVDiTRetargetStrategy", "SparseVDiTStrategyInfo", "SparseVDiTCompare"} <= set(ids)
    for s in schemas:
        assert s.node_id.startswith("SparseVDiT") and s.category == "Sparse-vDiT" and s.display_name
        assert s.outputs, s.node_id
        for port in s.inputs:
            assert port.options.get("tooltip"), f"{s.node_id}.{port.id} has no tooltip"
        assert len({p.id for p in s.inputs}) == len(s.inputs)
    apply = next(s for s in schemas if s.node_id == "SparseVDiTApplyStrategy")
    assert [p.io_type for p in apply.inputs] == ["MODEL", "SPARSE_VDIT_STRATEGY", "BOOLEAN"]
    assert [p.io_type for p in apply.outputs] == ["MODEL"]


@pytest.mark.parametrize("missing", ["latest", "hook"])
def test_too_old_comfyui_gets_one_clear_message(comfy, monkeypatch, missing):
    if missing == "latest":
        monkeypatch.setitem(sys.modules, "comfy_api.latest", None)
    else:
        monkeypatch.delattr(comfy.attention, "wrap_attn")
    from sparse_vdit.nodes import extension

    with pytest.raises(RuntimeError, match=r"needs ComfyUI >= 0\.3\.60.*Update ComfyUI"):
        asyncio.run(extension.make_extension())


def test_package_entrypoint_returns_the_extension(comfy):
    import sparse_vdit

    ext = asyncio.run(sparse_vdit.comfy_entrypoint())
    assert isinstance(ext, comfy.latest.ComfyExtension)


# ----------------------------------------------------------------------------- strategy folder


def test_strategy_folder_is_registered_fresh_and_next_to_a_user_folder(comfy, tmp_path):
    from sparse_vdit.nodes import strategy_store

    strategy_store.register_folder()
    paths, exts = comfy.fp.folder_names_and_paths["sparse_strategies"]
    assert paths == [os.path.join(comfy.fp.models_dir, "sparse_strategies")] and exts == {".safetensors"}
    comfy.fp.folder_names_and_paths["sparse_strategies"] = ([str(tmp_path / "mine")], set())
    strategy_store.register_folder()
    paths, exts = comfy.fp.folder_names_and_paths["sparse_strategies"]
    assert paths == [str(tmp_path / "mine"), os.path.join(comfy.fp.models_dir, "sparse_strategies")]
    assert exts == {".safetensors"}


def test_bad_strategy_files_raise_the_strategy_error_message(comfy):
    from sparse_vdit.nodes import strategy_store

    strategy_store.register_folder()
    from sparse_vdit.nodes import strategy_nodes
    from sparse_vdit.strategies.file import StrategyError

    root = comfy.fp.get_folder_paths("sparse_strategies")[0]
    os.makedirs(root)
    with open(os.path.join(root, "junk.safetensors"), "wb") as f:
        f.write(os.urandom(64))
    with pytest.raises(StrategyError) as err:
        strategy_nodes.LoadStrategy.execute("junk.safetensors")
    assert "junk.safetensors" in str(err.value)
    with pytest.raises(StrategyError, match="not found"):
        strategy_nodes.LoadStrategy.execute("gone.safetensors")
    assert strategy_nodes.LoadStrategy.fingerprint_inputs("gone.safetensors").startswith("missing")


def test_save_then_load_round_trips_and_an_edited_file_is_re_read(comfy):
    from sparse_vdit.nodes import strategy_store

    strategy_store.register_folder()
    from sparse_vdit.nodes import strategy_nodes

    strategy = tiny_strategy()
    saved = strategy_nodes.SaveStrategy.execute(strategy, "runs/wan").values[0]
    assert saved == "runs/wan_00001.safetensors"
    assert strategy_nodes.SaveStrategy.execute(strategy, "runs/wan").values[0] == "runs/wan_00002.safetensors"
    fp1 = strategy_nodes.LoadStrategy.fingerprint_inputs(saved)
    loaded = strategy_nodes.LoadStrategy.execute(saved).values[0]
    assert loaded.patterns == strategy.patterns and loaded.sigma_edges == strategy.sigma_edges
    assert strategy_nodes.LoadStrategy.execute(saved).values[0] is loaded  # cached while unchanged
    other = tiny_strategy(layers=3)
    from sparse_vdit.strategies.file import save_strategy

    path = strategy_store.strategy_path(saved)
    save_strategy(other, path)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    assert strategy_nodes.LoadStrategy.fingerprint_inputs(saved) != fp1
    assert strategy_nodes.LoadStrategy.execute(saved).values[0].layers == 3
    for bad in ["../escape", "", "a/../../b", "semi;colon"]:
        with pytest.raises(ValueError, match="bad file name"):
            strategy_nodes.SaveStrategy.execute(strategy, bad)


# ----------------------------------------------------------------------------- info and compare


def test_strategy_info_draws_modes_and_reports_density(comfy):
    from sparse_vdit.nodes import strategy_nodes, strategy_view
    from sparse_vdit.strategies.geometry import VideoGeometry

    strategy = tiny_strategy(layers=3, heads=2)
    out = strategy_nodes.StrategyInfo.execute(strategy)
    image, text = out.values
    assert image.dim() == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert "3 layers x 2 heads" in text and "predicted attention speedup" in text
    data = strategy_view.view_data(strategy, strategy_nodes._geometry(strategy, 0, 0, 0))
    assert data["modes"][0][0] == ["Diagonal", "skip", "dense"]   # head 0 over layers 0..2
    assert data["modes"][0][1] == ["skip", "dense", "Diagonal"]
    diagonal = strategy.patterns[0][0][0].density(VideoGeometry(2, 3, 4))
    assert data["layer_density"] == pytest.approx([diagonal / 2, 0.5, (1 + diagonal) / 2])
    with pytest.raises(ValueError, match="records no searched size"):
        strategy_nodes.StrategyInfo.execute(tiny_strategy(searched=False))


def test_many_buckets_are_thinned_for_the_pictures():
    from sparse_vdit.nodes.strategy_view import render_view, shown_buckets, view_data
    from sparse_vdit.strategies.geometry import VideoGeometry
    from sparse_vdit.strategies.patterns import Diagonal
    from sparse_vdit.strategies.strategy import Strategy

    assert shown_buckets(3) == [0, 1, 2]
    many = shown_buckets(30)
    assert len(many) == 6 and many[0] == 0 and many[-1] == 29 and many == sorted(set(many))
    rows = ((Diagonal(0.5),) * 4,) * 5
    edges = tuple(1.0 - i / 30 for i in range(31))
    s = Strategy(layers=5, heads=4, sigma_edges=edges, patterns=(rows,) * 30)
    data = view_data(s, VideoGeometry(2, 3, 4))
    assert data["shown"] == many and len(data["modes"]) == 30
    assert render_view(data).shape[1] < 1000


def test_warmup_buckets_and_dense_layers_show_as_dense():
    from sparse_vdit.nodes.strategy_view import mode_grid
    from sparse_vdit.strategies.patterns import Diagonal
    from sparse_vdit.strategies.strategy import Strategy

    rows = ((Diagonal(0.5),), (Diagonal(0.5),))
    s = Strategy(layers=2, heads=1, sigma_edges=(1.0, 0.6, 0.0), patterns=(rows, rows),
                 dense_above_sigma=0.6, dense_layers=frozenset({1}))
    assert mode_grid(s) == [[["dense", "dense"]], [["Diagonal", "dense"]]]


def test_compare_reports_per_frame_psnr_and_ssim_against_float64(comfy):
    from sparse_vdit.nodes import compare_node, compare_frames

    gen = torch.Generator().manual_seed(0)
    dense = torch.rand(3, 17, 23, 3, generator=gen)
    sparse = dense.clone()
    sparse[1] = (sparse[1] + 0.05 * torch.randn(17, 23, 3, generator=gen)).clamp(0, 1)
    out = compare_node.CompareVideos.execute(dense, sparse)
    text, plot = out.values
    psnr = compare_frames.psnr_per_frame(dense, sparse)
    mse = ((dense[1].double() - sparse[1].double()) ** 2).mean()
    assert psnr[0] == float("inf") and psnr[1] == pytest.approx(float(-10 * torch.log10(mse)))
    ssim = compare_frames.ssim_per_frame(dense, sparse)
    assert ssim[0] == pytest.approx(1.0) and 0.0 < ssim[1] < 0.99
    assert "3 frames" in text and plot.shape[0] == 1 and plot.shape[-1] == 3
    with pytest.raises(ValueError, match="differ in shape"):
        compare_node.CompareVideos.execute(dense, sparse[:2])
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        compare_frames.psnr_per_frame(dense[0], sparse[0])


def test_info_route_answers_json_and_clear_errors(comfy):
    from sparse_vdit.nodes import routes, strategy_store

    strategy_store.register_folder()
    status, body = routes.strategy_info({})
    assert status == 400 and "name" in body["error"]
    status, body = routes.strategy_info({"name": "nope.safetensors"})
    assert status == 404 and "not found" in body["error"]
    name = strategy_store.save(tiny_strategy(), "viewer")
    status, body = routes.strategy_info({"name": name})
    assert status == 200 and body["layers"] == 2 and body["heads"] == 2
    assert body["geometry"] == [2, 3, 4] and set(body["palette"]) >= {"dense", "skip", "Diagonal"}
    status, body = routes.strategy_info({"name": name, "frames": "4", "height": "6", "width": "8"})
    assert body["geometry"] == [4, 6, 8]
    assert routes.register_routes() is False  # no ComfyUI server here
