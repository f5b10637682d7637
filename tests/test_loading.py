"""Offline loading: files the tests write in every supported format load to the same weights;
wrong, damaged or unsupported files raise LoadError naming what was expected."""

import re

import pytest
import torch
from safetensors.torch import save_file

from sparse_vdit.adapters.loading import (
    LoadError,
    decode_video,
    load_transformer,
    load_vae,
    shipped_config,
    shipped_variants,
)


def build(variant, seed=0):
    torch.manual_seed(seed)
    config = shipped_config(variant)
    import diffusers

    model = getattr(diffusers, config["_class_name"]).from_config(config).eval()
    with torch.no_grad():  # make every parameter random, so no key could match by accident
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


WAN_TO_ORIGINAL = [  # diffusers -> original (Wan), applied in order
    (r"^condition_embedder\.time_embedder\.linear_1", "time_embedding.0"),
    (r"^condition_embedder\.time_embedder\.linear_2", "time_embedding.2"),
    (r"^condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
    (r"^condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
    (r"^condition_embedder\.time_proj", "time_projection.1"),
    (r"\.attn1\.", ".self_attn."), (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."), (r"\.to_out\.0\.", ".o."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."), (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."), (r"^(blocks\.\d+)\.scale_shift_table", r"\1.modulation"),
    (r"^scale_shift_table", "head.modulation"), (r"^proj_out\.", "head.head."),
]


def wan_original(sd):
    out = {}
    for key, value in sd.items():
        for pattern, repl in WAN_TO_ORIGINAL:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


HUNYUAN_RENAMES = [  # diffusers -> original (HunyuanVideo) for the keys that are only renamed
    ("context_embedder.token_refiner.refiner_blocks.", "txt_in.individual_token_refiner.blocks."),
    ("context_embedder.time_text_embed.timestep_embedder.linear_1", "txt_in.t_embedder.mlp.0"),
    ("context_embedder.time_text_embed.timestep_embedder.linear_2", "txt_in.t_embedder.mlp.2"),
    ("context_embedder.time_text_embed.text_embedder.", "txt_in.c_embedder."),
    ("context_embedder.proj_in.", "txt_in.input_embedder."),
    ("x_embedder.", "img_in."),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.mlp.0"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.mlp.2"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.mlp.0"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.mlp.2"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("transformer_blocks.", "double_blocks."),
    ("attn.norm_q", "img_attn_q_norm"), ("attn.norm_k", "img_attn_k_norm"),
    ("attn.norm_added_q", "txt_attn_q_norm"), ("attn.norm_added_k", "txt_attn_k_norm"),
    ("attn.to_add_out", "txt_attn_proj"), ("norm1_context.linear", "txt_mod.linear"),
    ("norm1.linear", "img_mod.linear"), ("ff_context.net.0.proj", "txt_mlp.fc1"), ("ff_context.net.2", "txt_mlp.fc2"),
    ("ff.net.0.proj", "img_mlp.fc1"), ("ff.net.2", "img_mlp.fc2"), ("proj_out", "final_layer.linear"),
]


def hunyuan_original(sd):
    """The original HunyuanVideo layout of a diffusers state dict (fused qkv, single-block linear1)."""
    sd, out = dict(sd), {}
    for name in [k for k in sd if k.startswith("single_transformer_blocks.") and k.endswith(".attn.to_q.weight")]:
        base = name[: -len(".attn.to_q.weight")]
        block = "single_blocks." + base.split(".")[1]
        for kind in ("weight", "bias"):
            parts = [sd.pop(f"{base}.{p}.{kind}") for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
            out[f"{block}.linear1.{kind}"] = torch.cat(parts)
        for old, new in (("attn.norm_q.weight", "q_norm.weight"), ("attn.norm_k.weight", "k_norm.weight")):
            out[f"{block}.{new}"] = sd.pop(f"{base}.{old}")
        for kind in ("weight", "bias"):
            out[f"{block}.linear2.{kind}"] = sd.pop(f"{base}.proj_out.{kind}")
            out[f"{block}.modulation.linear.{kind}"] = sd.pop(f"{base}.norm.linear.{kind}")
    fused = [(".attn.to_q.", (".attn.to_q.", ".attn.to_k.", ".attn.to_v."), "img_attn_qkv"),
             (".attn.add_q_proj.", (".attn.add_q_proj.", ".attn.add_k_proj.", ".attn.add_v_proj."), "txt_attn_qkv")]
    for first, names, target in fused:
        for key in [k for k in sd if first in k]:
            parts = [sd.pop(key.replace(first, n)) for n in names]
            refiner = key.startswith("context_embedder.")
            sd[key.replace(first, ".self_attn_qkv." if refiner else f".{target}.")] = torch.cat(parts)
    for key, value in sd.items():
        if key.startswith("context_embedder.token_refiner."):
            key = (key.replace("attn.to_out.0", "self_attn_proj").replace("ff.net.0.proj", "mlp.fc1")
                   .replace("ff.net.2", "mlp.fc2").replace("norm_out.linear", "adaLN_modulation.1"))
        elif key.startswith("norm_out.linear."):
            scale, shift = value.chunk(2)
            key, value = key.replace("norm_out.linear", "final_layer.adaLN_modulation.1"), torch.cat([shift, scale])
        key = key.replace("attn.to_out.0", "img_attn_proj")
        for old, new in HUNYUAN_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def assert_same_weights(loaded, reference, dtype=None):
    got = loaded.state_dict()
    assert set(got) == set(reference)
    for key, value in reference.items():
        expected = value if dtype is None else value.to(dtype).to(value.dtype)
        assert torch.equal(got[key].to(value.dtype), expected), key


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_wan_original_keys_load_to_the_same_weights(tmp_path, prefix, dtype):
    model = build("wan-tiny")
    reference = state(model)
    path = tmp_path / "wan.safetensors"
    save_file({prefix + k: v.to(dtype) for k, v in wan_original(reference).items()}, str(path))
    loaded = load_transformer(path, dtype=torch.float32)
    assert (loaded.family, loaded.variant, loaded.source) == ("wan", "wan-tiny", "single file (original keys)")
    assert_same_weights(loaded.model, reference, dtype)


def test_wan_scaled_fp8_is_dequantised(tmp_path):
    model = build("wan-tiny")
    reference = state(model)
    original = wan_original(reference)
    quantised = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    scales = {}
    for key, value in original.items():
        if key.endswith(".weight") and value.ndim == 2:
            scale = value.abs().max() / 448.0
            scales[key] = scale
            quantised["model.diffusion_model." + key] = (value / scale).to(torch.float8_e4m3fn)
            quantised["model.diffusion_model." + key[:-len("weight")] + "scale_weight"] = scale.reshape(1)
            quantised["model.diffusion_model." + key[:-len("weight")] + "scale_input"] = torch.ones(1)
        else:
            quantised["model.diffusion_model." + key] = value
    path = tmp_path / "wan_scaled.safetensors"
    save_file(quantised, str(path))
    loaded = load_transformer(path, dtype=torch.float32).model.state_dict()
    for key, value in reference.items():
        if value.ndim == 2 and key.endswith(".weight"):
            # fp8 keeps 3 mantissa bits: dequantised weights are within 1/16 relative of the originals,
            # and nowhere near the raw fp8 numbers (up to 448) a loader that drops the scale would give
            torch.testing.assert_close(loaded[key], value, rtol=0.07, atol=value.abs().max().item() / 64)
            assert loaded[key].abs().max() <= value.abs().max() * 1.07
        else:
            assert torch.equal(loaded[key], value), key


def test_scaled_fp8_with_an_unusable_scale_is_refused(tmp_path):
    original = wan_original(state(build("wan-tiny")))
    key = next(k for k, v in original.items() if k.endswith(".weight") and v.ndim == 2)
    original[key] = original[key].to(torch.float8_e4m3fn)
    original[key[:-len("weight")] + "scale_weight"] = torch.ones(3, 5)
    path = tmp_path / "bad_scale.safetensors"
    save_file(original, str(path))
    with pytest.raises(LoadError, match="does not broadcast"):
        load_transformer(path)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_hunyuan_original_keys_load_to_the_same_weights(tmp_path, prefix):
    model = build("hunyuanvideo-tiny")
    reference = state(model)
    path = tmp_path / "hunyuan.safetensors"
    save_file({prefix + k: v for k, v in hunyuan_original(reference).items()}, str(path))
    loaded = load_transformer(path, dtype=torch.float32)
    assert (loaded.family, loaded.variant) == ("hunyuanvideo", "hunyuanvideo-tiny")
    assert_same_weights(loaded.model, reference)


@pytest.mark.parametrize("variant", ["wan-tiny", "hunyuanvideo-tiny", "cogvideox1.5-tiny"])
def test_diffusers_keys_files_and_folders_load_to_the_same_weights(tmp_path, variant):
    model = build(variant)
    reference = state(model)
    path = tmp_path / "model.safetensors"
    save_file(reference, str(path))
    from_file = load_transformer(path, dtype=torch.float32)
    assert from_file.variant == variant and from_file.source == "single file (diffusers keys)"
    assert_same_weights(from_file.model, reference)
    model.save_pretrained(tmp_path / "pipeline" / "transformer")
    from_folder = load_transformer(tmp_path / "pipeline", dtype=torch.float32)
    assert from_folder.source == "diffusers folder" and type(from_folder.model) is type(model)
    assert_same_weights(from_folder.model, reference)


def test_bf16_load_keeps_the_fp32_modules_like_diffusers(tmp_path):
    reference = state(build("wan-tiny"))
    path = tmp_path / "wan.safetensors"
    save_file(wan_original(reference), str(path))
    model = load_transformer(path, dtype=torch.bfloat16).model
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.scale_shift_table.dtype == torch.float32 and model.blocks[0].scale_shift_table.dtype == torch.float32


def test_wrong_damaged_and_unsupported_files_raise_load_error(tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    good = tmp_path / "good.safetensors"
    save_file(state(build("wan-tiny")), str(good))
    damaged.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(LoadError, match="truncated or damaged"):
        load_transformer(damaged)
    other = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(other))
    with pytest.raises(LoadError, match="expected a Wan2.1/2.2, HunyuanVideo or CogVideoX1.5"):
        load_transformer(other)
    partial = tmp_path / "partial.safetensors"
    sd = state(build("wan-tiny"))
    sd.pop("blocks.1.ffn.net.2.weight")
    save_file(sd, str(partial))
    with pytest.raises(LoadError, match="match none of the shipped configs"):
        load_transformer(partial)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"0")
    with pytest.raises(LoadError, match="expected a .safetensors"):
        load_transformer(pickle)
    with pytest.raises(LoadError, match="no such file"):
        load_transformer(tmp_path / "missing.safetensors")
    with pytest.raises(LoadError, match="config.json"):
        load_transformer(tmp_path)
    vae_file = tmp_path / "vae.safetensors"
    save_file(state(build("wan-vae-tiny")), str(vae_file))
    with pytest.raises(LoadError, match="VAE checkpoint"):
        load_transformer(vae_file)
    quant = tmp_path / "mixed.safetensors"
    save_file({"blocks.0.q.weight": torch.zeros(2), "blocks.0.q.weight_scale": torch.ones(1)}, str(quant))
    with pytest.raises(LoadError, match="not supported"):
        load_transformer(quant)
    with pytest.raises(LoadError, match="known variants"):
        shipped_config("wan-9000b")


def test_every_shipped_config_is_a_distinct_variant():
    import diffusers

    for class_name in ("WanTransformer3DModel", "HunyuanVideoTransformer3DModel", "CogVideoXTransformer3DModel",
                       "AutoencoderKLWan", "AutoencoderKLHunyuanVideo", "AutoencoderKLCogVideoX"):
        shapes = []
        for variant in shipped_variants(class_name):
            with torch.device("meta"):
                model = getattr(diffusers, class_name).from_config(shipped_config(variant))
            shapes.append(frozenset((k, tuple(p.shape)) for k, p in model.named_parameters()))
        assert len(set(shapes)) == len(shapes), class_name
    assert {"wan-t2v-1.3b", "wan-t2v-14b", "wan2.1-i2v-14b", "wan2.2-ti2v-5b", "hunyuanvideo-t2v",
            "cogvideox1.5-5b-t2v", "wan2.1-vae", "wan2.2-vae", "hunyuanvideo-vae", "cogvideox1.5-vae"} <= set(shipped_variants())


@pytest.mark.parametrize("variant,family,latent", [
    ("wan-vae-tiny", "wan", (1, 4, 2, 4, 6)),
    ("hunyuanvideo-vae-tiny", "hunyuanvideo", (1, 4, 2, 4, 6)),
    ("cogvideox-vae-tiny", "cogvideox", (1, 2, 4, 4, 6)),
])
def test_vae_round_trip_and_decode(tmp_path, variant, family, latent):
    vae = build(variant)
    reference = state(vae)
    path = tmp_path / "vae.safetensors"
    save_file(reference, str(path))
    loaded = load_vae(path)
    assert (loaded.family, loaded.variant) == (family, variant)
    assert_same_weights(loaded.model, reference)
    latents = torch.randn(latent, generator=torch.Generator().manual_seed(0))
    frames = decode_video(loaded.model, latents, family, tiled=False)
    t = latent[2] if family != "cogvideox" else latent[1]
    assert frames.shape[:2] == (1, 3) and frames.shape[3:] == (latent[3] * 8, latent[4] * 8)
    assert torch.isfinite(frames).all()
    if family != "cogvideox":  # causal VAEs: 1 + 4 (t - 1) frames
        assert frames.shape[2] == (t - 1) * 4 + 1
    else:
        assert frames.shape[2] > t
    with pytest.raises(ValueError, match="family must be one of"):
        decode_video(loaded.model, latents, "sd15")
