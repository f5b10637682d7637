"""Tiny random-weight native checkpoints that ComfyUI's UNETLoader accepts, written at test time.

The weights come from a diffusers model at a tiny size (dim 256 = 2 heads x 128); the original
(Wan repository) key names are recovered through our adapters' key map (original -> diffusers),
run on marker tensors, so the file round-trips exactly through ``adapters.loading``.
"""

from __future__ import annotations

import torch

from sparse_vdit.adapters.loading import to_diffusers_keys

WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=512, num_layers=3, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def wan_original_keys(layers: int) -> list[str]:
    """Parameter names of a Wan2.1 T2V checkpoint in the original (non-diffusers) naming."""
    keys = ["patch_embedding.weight", "patch_embedding.bias", "head.head.weight", "head.head.bias",
            "head.modulation"]
    keys += [f"{m}.{i}.{p}" for m in ("time_embedding", "text_embedding") for i in (0, 2) for p in ("weight", "bias")]
    keys += ["time_projection.1.weight", "time_projection.1.bias"]
    for b in range(layers):
        keys.append(f"blocks.{b}.modulation")
        for attn in ("self_attn", "cross_attn"):
            keys += [f"blocks.{b}.{attn}.{n}.{p}" for n in "qkvo" for p in ("weight", "bias")]
            keys += [f"blocks.{b}.{attn}.norm_{n}.weight" for n in "qk"]
        keys += [f"blocks.{b}.norm3.{p}" for p in ("weight", "bias")]
        keys += [f"blocks.{b}.ffn.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    return keys


def tiny_wan_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random tiny Wan2.1 T2V state dict in original key names (scaled so activations stay sane)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**WAN_TINY)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    original = wan_original_keys(WAN_TINY["num_layers"])
    markers = to_diffusers_keys("wan", {k: torch.tensor([float(i)]) for i, k in enumerate(original)})
    if set(markers) != set(reference):
        raise AssertionError(f"key map mismatch: {sorted(set(markers) ^ set(reference))[:6]}")
    return {original[int(v.item())]: reference[k].contiguous() for k, v in markers.items()}


def tiny_wan_lora(rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random rank-``rank`` LoRA on the tiny Wan's self-attention projections (ComfyUI key format)."""
    g = torch.Generator().manual_seed(seed)
    dim = WAN_TINY["num_attention_heads"] * WAN_TINY["attention_head_dim"]
    out = {}
    for b in range(WAN_TINY["num_layers"]):
        for n in "qkvo":
            key = f"diffusion_model.blocks.{b}.self_attn.{n}"
            out[f"{key}.lora_down.weight"] = torch.randn(rank, dim, generator=g) * 0.1
            out[f"{key}.lora_up.weight"] = torch.randn(dim, rank, generator=g) * 0.1
    return out


HUNYUAN_TINY = dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=128, num_layers=2,
                    num_single_layers=2, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                    qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                    rope_theta=256.0, rope_axes_dim=(16, 56, 56))


def _hunyuan_parts(d: dict) -> dict[str, tuple[str, ...]]:
    """Original HunyuanVideo key -> the diffusers keys it is the concatenation of (dim 0)."""
    parts: dict[str, tuple[str, ...]] = {}

    def linear(orig: str, *diff: str) -> None:
        for p in ("weight", "bias"):
            parts[f"{orig}.{p}"] = tuple(f"{x}.{p}" for x in diff)

    linear("img_in.proj", "x_embedder.proj")
    for orig, diff in (("time_in.mlp.0", "timestep_embedder.linear_1"), ("time_in.mlp.2", "timestep_embedder.linear_2"),
                       ("guidance_in.mlp.0", "guidance_embedder.linear_1"), ("guidance_in.mlp.2", "guidance_embedder.linear_2"),
                       ("vector_in.in_layer", "text_embedder.linear_1"), ("vector_in.out_layer", "text_embedder.linear_2")):
        linear(orig, f"time_text_embed.{diff}")
    ctx = "context_embedder"
    linear("txt_in.input_embedder", f"{ctx}.proj_in")
    linear("txt_in.t_embedder.mlp.0", f"{ctx}.time_text_embed.timestep_embedder.linear_1")
    linear("txt_in.t_embedder.mlp.2", f"{ctx}.time_text_embed.timestep_embedder.linear_2")
    linear("txt_in.c_embedder.linear_1", f"{ctx}.time_text_embed.text_embedder.linear_1")
    linear("txt_in.c_embedder.linear_2", f"{ctx}.time_text_embed.text_embedder.linear_2")
    for i in range(d["num_refiner_layers"]):
        o, n = f"txt_in.individual_token_refiner.blocks.{i}", f"{ctx}.token_refiner.refiner_blocks.{i}"
        for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("self_attn_proj", "attn.to_out.0"),
                     ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2"), ("adaLN_modulation.1", "norm_out.linear")):
            linear(f"{o}.{a}", f"{n}.{b}")
        linear(f"{o}.self_attn_qkv", *(f"{n}.attn.to_{x}" for x in "qkv"))
    for i in range(d["num_layers"]):
        o, n = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for a, b in (("img_mod.linear", "norm1.linear"), ("img_attn_proj", "attn.to_out.0"), ("img_mlp.fc1", "ff.net.0.proj"),
                     ("img_mlp.fc2", "ff.net.2"), ("txt_mod.linear", "norm1_context.linear"),
                     ("txt_attn_proj", "attn.to_add_out"), ("txt_mlp.fc1", "ff_context.net.0.proj"),
                     ("txt_mlp.fc2", "ff_context.net.2")):
            linear(f"{o}.{a}", f"{n}.{b}")
        linear(f"{o}.img_attn_qkv", *(f"{n}.attn.to_{x}" for x in "qkv"))
        linear(f"{o}.txt_attn_qkv", *(f"{n}.attn.add_{x}_proj" for x in "qkv"))
        for a, b in (("img_attn_q_norm", "norm_q"), ("img_attn_k_norm", "norm_k"),
                     ("txt_attn_q_norm", "norm_added_q"), ("txt_attn_k_norm", "norm_added_k")):
            parts[f"{o}.{a}.weight"] = (f"{n}.attn.{b}.weight",)
    for i in range(d["num_single_layers"]):
        o, n = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        linear(f"{o}.linear1", *(f"{n}.attn.to_{x}" for x in "qkv"), f"{n}.proj_mlp")
        linear(f"{o}.linear2", f"{n}.proj_out")
        linear(f"{o}.modulation.linear", f"{n}.norm.linear")
        parts[f"{o}.q_norm.weight"] = (f"{n}.attn.norm_q.weight",)
        parts[f"{o}.k_norm.weight"] = (f"{n}.attn.norm_k.weight",)
    linear("final_layer.linear", "proj_out")
    return parts


def tiny_hunyuan_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random tiny HunyuanVideo T2V state dict in original key names, checked to round-trip
    exactly through our adapters' key map."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(**HUNYUAN_TINY)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    original = {k: torch.cat([reference[p] for p in ps]).contiguous()
                for k, ps in _hunyuan_parts(HUNYUAN_TINY).items()}
    for p in ("weight", "bias"):  # diffusers stores (scale, shift), the original (shift, scale)
        scale, shift = reference[f"norm_out.linear.{p}"].chunk(2)
        original[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale]).contiguous()
    back = to_diffusers_keys("hunyuanvideo", {k: v.clone() for k, v in original.items()})
    if set(back) != set(reference) or any(not torch.equal(back[k], reference[k]) for k in reference):
        raise AssertionError(f"key map mismatch: {sorted(set(back) ^ set(reference))[:6]}")
    return original
