"""The diffusers-path nodes (Load Model, Sampler, Decode) on tiny random CogVideoX models, and the
LATENT convention shared with ComfyUI's VAE Decode."""

import pytest
import torch

from test_nodes import Interrupted, comfy  # noqa: F401  (comfy: fixture)


@pytest.fixture
def tiny_cog(comfy, tmp_path):  # noqa: F811
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    from sparse_vdit.adapters.loading import shipped_config

    root = tmp_path / "models" / "diffusers"
    torch.manual_seed(0)
    CogVideoXTransformer3DModel.from_config(shipped_config("cogvideox1.5-tiny")).save_pretrained(root / "tinycog")
    AutoencoderKLCogVideoX.from_config(shipped_config("cogvideox-vae-tiny")).save_pretrained(root / "tinycogvae")
    return comfy


def conditioning(seed, tokens=8, width=32):
    return [[torch.randn(1, tokens, width, generator=torch.Generator().manual_seed(seed)), {}]]


def test_load_sample_decode_cogvideox_matches_the_adapter_sampler(tiny_cog):
    from sparse_vdit.adapters import sampling
    from sparse_vdit.nodes import diffusers_nodes, latent_convention

    assert "diffusers/tinycog" in diffusers_nodes.model_choices("diffusion_models")
    loaded = diffusers_nodes.LoadDiffusersModel.execute("diffusers/tinycog", "fp32").values[0]
    assert loaded.family == "cogvideox"
    pos, neg = conditioning(1), conditioning(2)
    latent = diffusers_nodes.DiffusersSampler.execute(loaded, pos, neg, width=32, height=32, frames=9, steps=2,
                                                      cfg=6.0, shift=0.0, seed=5).values[0]
    assert latent["samples"].shape == (1, 4, 4, 4, 4)  # raw [B, C, F (3 padded to 4), H, W]
    assert [p[0] for p in tiny_cog.run.progress] == [1, 2]
    with torch.no_grad():
        noise = sampling.initial_noise((1, 4, 4, 4, 4), 5)
        expected = sampling.sample_cogvideox(loaded.model, noise, pos[0][0], negative_embeds=neg[0][0],
                                             steps=2, guidance=6.0, seed=5)
    torch.testing.assert_close(latent["samples"], latent_convention.to_comfy(expected, "cogvideox"))
    images = diffusers_nodes.DiffusersDecode.execute(latent, "diffusers/tinycogvae").values[0]
    assert images.dim() == 4 and images.shape[1:] == (32, 32, 3) and images.shape[0] >= 9
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0


def test_sampler_cancel_and_bad_inputs_give_clear_errors(tiny_cog):
    from sparse_vdit.adapters.loading import LoadError
    from sparse_vdit.nodes import diffusers_nodes

    loaded = diffusers_nodes.LoadDiffusersModel.execute("diffusers/tinycog", "fp32").values[0]
    args = dict(positive=conditioning(1), negative=conditioning(2), width=32, height=32, frames=9, steps=3,
                cfg=6.0, shift=0.0, seed=0)
    tiny_cog.run.interrupt_after = 1
    with pytest.raises(Interrupted):
        diffusers_nodes.DiffusersSampler.execute(loaded, **args)
    tiny_cog.run.interrupt_after = None
    with pytest.raises(ValueError, match="4k\\+1"):
        diffusers_nodes.DiffusersSampler.execute(loaded, **dict(args, frames=8))
    with pytest.raises(ValueError, match="CONDITIONING"):
        diffusers_nodes.DiffusersSampler.execute(loaded, **dict(args, positive=[]))
    with pytest.raises(LoadError, match="not found"):
        diffusers_nodes.LoadDiffusersModel.execute("gone.safetensors", "fp32")
    latent = {"samples": torch.zeros(1, 4, 2, 4, 4), "sparse_vdit_family": "wan"}
    with pytest.raises(ValueError, match="wan model but .* cogvideox VAE"):
        diffusers_nodes.DiffusersDecode.execute(latent, "diffusers/tinycogvae")


@pytest.mark.parametrize("family,shape", [("wan", (2, 16, 3, 4, 5)), ("hunyuanvideo", (1, 16, 2, 3, 4)),
                                          ("cogvideox", (1, 3, 16, 4, 5))])
def test_latent_convention_round_trips_and_matches_the_vae_constants(family, shape):
    from sparse_vdit.adapters.loading import shipped_config
    from sparse_vdit.nodes import latent_convention

    x = torch.randn(shape, dtype=torch.float64)
    raw = latent_convention.to_comfy(x, family)
    torch.testing.assert_close(latent_convention.from_comfy(raw, family), x)
    if family == "wan":
        cfg = shipped_config("wan2.1-vae")
        expected = x * torch.tensor(cfg["latents_std"], dtype=x.dtype).view(1, -1, 1, 1, 1) \
            + torch.tensor(cfg["latents_mean"], dtype=x.dtype).view(1, -1, 1, 1, 1)
    elif family == "hunyuanvideo":
        expected = x / shipped_config("hunyuanvideo-vae")["scaling_factor"]
    else:
        expected = x.permute(0, 2, 1, 3, 4) / shipped_config("cogvideox1.5-vae")["scaling_factor"]
    torch.testing.assert_close(raw, expected)


def test_latent_convention_rejects_what_comfyui_cannot_decode():
    from sparse_vdit.nodes import latent_convention

    with pytest.raises(ValueError, match="4 channels"):
        latent_convention.to_comfy(torch.zeros(1, 4, 2, 2, 2), "wan")
    with pytest.raises(ValueError, match="family must be"):
        latent_convention.to_comfy(torch.zeros(1, 4, 2, 2, 2), "sd15")
    with pytest.raises(ValueError, match=r"\[B, C, F, H, W\]"):
        latent_convention.from_comfy(torch.zeros(4, 2, 2, 2), "hunyuanvideo")


def test_search_through_the_diffusers_sampler_writes_a_strategy(tiny_cog):
    from sparse_vdit.nodes import diffusers_nodes, strategy_store

    strategy_store.register_folder()
    loaded = diffusers_nodes.LoadDiffusersModel.execute("diffusers/tinycog", "fp32").values[0]
    out = diffusers_nodes.DiffusersSearch.execute(
        loaded, conditioning(1), conditioning(2), width=32, height=32, frames=9, steps=2, cfg=6.0, shift=0.0,
        seed=0, budget="target speedup", value=1.5, filename_prefix="tests/cog", resume=False)
    strategy, dense, info = out.values
    assert strategy.layers == 2 and strategy.heads == 2
    assert info.startswith("saved models/sparse_strategies/tests/cog_00001.safetensors")
    assert dense["samples"].shape == (1, 4, 4, 4, 4) and dense["sparse_vdit_family"] == "cogvideox"
    assert tiny_cog.run.progress[-1] == (4, 4)  # two passes of two steps
    assert strategy_store.load("tests/cog_00001.safetensors").meta["model"]["family"] == "cogvideox"


@pytest.mark.parametrize("family", ["wan", "hunyuanvideo", "cogvideox"])
def test_step_sigmas_are_what_the_sampler_reports(comfy, family):  # noqa: F811
    from diffusers import CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel

    from sparse_vdit.adapters import sampling
    from sparse_vdit.adapters.loading import shipped_config
    from sparse_vdit.nodes import diffusers_nodes

    torch.manual_seed(0)
    seen = []
    record = lambda step, total, sigma: seen.append(sigma)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if family == "wan":
            model = WanTransformer3DModel.from_config(shipped_config("wan-tiny"))
            sampling.sample_wan(model, torch.randn(1, 4, 2, 4, 4, generator=g), torch.randn(1, 5, 32, generator=g),
                                guidance=1.0, steps=3, shift=3.0, callback=record)
        elif family == "hunyuanvideo":
            model = HunyuanVideoTransformer3DModel.from_config(shipped_config("hunyuanvideo-tiny"))
            sampling.sample_hunyuan(model, torch.randn(1, 4, 2, 4, 4, generator=g), torch.randn(1, 5, 32, generator=g),
                                    torch.randn(1, 16, generator=g), steps=3, shift=7.0, callback=record)
        else:
            model = CogVideoXTransformer3DModel.from_config(shipped_config("cogvideox1.5-tiny"))
            sampling.sample_cogvideox(model, torch.randn(1, 2, 4, 4, 4, generator=g), torch.randn(1, 8, 32, generator=g),
                                      guidance=1.0, steps=3, callback=record)
    shift = {"wan": 3.0, "hunyuanvideo": 7.0, "cogvideox": 0.0}[family]
    assert diffusers_nodes.step_sigmas(family, 3, shift) == pytest.approx(seen)
