"""Sampling loops: parity with the diffusers pipelines, determinism, callbacks, controller steps."""

import pytest
import torch
from diffusers import (
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    WanPipeline,
    WanTransformer3DModel,
)

from sparse_vdit.adapters.common import DenseController
from sparse_vdit.adapters.loading import shipped_config
from sparse_vdit.adapters.sampling import (
    cogvideox_scheduler,
    hunyuan_scheduler,
    initial_noise,
    sample_cogvideox,
    sample_hunyuan,
    sample_wan,
    wan_scheduler,
)


def tiny(cls, variant, seed):
    torch.manual_seed(seed)
    return cls.from_config(shipped_config(variant)).eval()


class Recorder(DenseController):
    def __init__(self):
        self.calls = []

    def attention(self, q, k, v, **kw):
        self.calls.append(dict(shape=tuple(q.shape), **kw))
        return kw["dense"](q, k, v)


class StepRecorder(DenseController):
    def __init__(self):
        self.steps = []

    def begin_step(self, sigma, step):
        self.steps.append((step, sigma))


def wan_embeds(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)


def test_initial_noise_is_seeded():
    a = initial_noise((1, 4, 3, 6, 10), 5)
    assert torch.equal(a, initial_noise((1, 4, 3, 6, 10), 5))
    assert not torch.equal(a, initial_noise((1, 4, 3, 6, 10), 6))


@pytest.mark.parametrize("two_experts", [False, True])
def test_wan_matches_pipeline_and_tells_the_controller_each_step(two_experts):
    high = tiny(WanTransformer3DModel, "wan-tiny", 0)
    low = tiny(WanTransformer3DModel, "wan-tiny", 1) if two_experts else None
    noise = initial_noise((1, 4, 3, 6, 10), 0)
    prompt, negative = wan_embeds()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=wan_scheduler(3.0), transformer=high,
                       transformer_2=low, boundary_ratio=0.875 if two_experts else None)
    with torch.no_grad():
        expected = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, latents=noise.clone(), height=48,
                        width=80, num_frames=9, num_inference_steps=4, guidance_scale=5.0,
                        guidance_scale_2=3.0 if two_experts else None, output_type="latent").frames
        calls, seen = [], []
        hooks = [m.register_forward_hook(lambda m, a, o, name=name: calls.append(name))
                 for name, m in (("high", high), ("low", low)) if m is not None]
        recorder = StepRecorder()
        got = sample_wan(high, noise, prompt, negative_embeds=negative, steps=4, guidance=5.0, shift=3.0,
                         low_noise_transformer=low, guidance_low=3.0, controller=recorder,
                         callback=lambda *a: seen.append(a))
        for h in hooks:
            h.remove()
    assert torch.equal(got, expected)
    sigmas = [s for _, s in recorder.steps]
    assert [i for i, _ in recorder.steps] == [0, 1, 2, 3] and sigmas == sorted(sigmas, reverse=True)
    assert seen == [(i, 4, s) for i, s in enumerate(sigmas)]
    # timesteps 999, 900, 750, 500 at shift 3: two steps per expert at boundary 875, CFG = 2 forwards
    assert calls == (["high"] * 4 + ["low"] * 4 if two_experts else ["high"] * 8)
    assert all(type(p).__name__ == "WanAttnProcessor" for p in high.attn_processors.values())


def test_wan_cfg1_few_steps_is_deterministic_and_needs_no_negative():
    model = tiny(WanTransformer3DModel, "wan-tiny", 0)
    prompt, _ = wan_embeds()
    with torch.no_grad():
        runs = [sample_wan(model, initial_noise((1, 4, 3, 6, 10), 9), prompt, steps=2, guidance=1.0) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and torch.isfinite(runs[0]).all()


def test_wan_i2v_uses_condition_and_image_tokens_and_keeps_video_only_self_attention():
    config = dict(shipped_config("wan-tiny"), in_channels=9, image_dim=8, added_kv_proj_dim=32)
    torch.manual_seed(0)
    model = WanTransformer3DModel.from_config(config).eval()
    prompt, negative = wan_embeds()
    g = torch.Generator().manual_seed(8)
    condition, image = torch.randn(1, 5, 3, 6, 10, generator=g), torch.randn(1, 3, 8, generator=g)
    recorder = Recorder()
    run = lambda cond, **kw: sample_wan(model, initial_noise((1, 4, 3, 6, 10), 1), prompt, negative_embeds=negative,
                                        steps=2, guidance=4.0, condition=cond, image_embeds=image, **kw)
    with torch.no_grad():
        first = run(condition, controller=recorder)
        again = run(condition)
        other = run(condition + 1)
    assert torch.equal(first, again) and not torch.allclose(first, other)
    assert {c["shape"] for c in recorder.calls} == {(1, 45, 2, 16)} and len(recorder.calls) == 2 * 2 * 2


def test_wan_bad_inputs_raise():
    model = tiny(WanTransformer3DModel, "wan-tiny", 0)
    prompt, _ = wan_embeds()
    with pytest.raises(ValueError, match="negative"):
        sample_wan(model, initial_noise((1, 4, 3, 6, 10), 0), prompt, steps=2, guidance=5.0)
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        sample_wan(model, torch.zeros(4, 3, 6, 10), prompt, steps=2, guidance=1.0)
    with pytest.raises(ValueError, match="steps"):
        sample_wan(model, initial_noise((1, 4, 3, 6, 10), 0), prompt, steps=0, guidance=1.0)


def test_hunyuan_matches_pipeline_and_tells_the_controller_each_step():
    model = tiny(HunyuanVideoTransformer3DModel, "hunyuanvideo-tiny", 0)
    g = torch.Generator().manual_seed(4)
    noise = initial_noise((1, 4, 3, 6, 10), 0)
    prompt, pooled = torch.randn(1, 6, 32, generator=g), torch.randn(1, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=model, vae=None,
                                scheduler=hunyuan_scheduler(7.0), text_encoder_2=None, tokenizer_2=None)
    with torch.no_grad():
        expected = pipe(prompt_embeds=prompt, pooled_prompt_embeds=pooled, prompt_attention_mask=mask,
                        latents=noise.clone(), height=48, width=80, num_frames=9, num_inference_steps=3,
                        guidance_scale=6.0, output_type="latent").frames
        recorder, seen = StepRecorder(), []
        got = sample_hunyuan(model, noise, prompt, pooled, prompt_mask=mask, steps=3, embedded_guidance=6.0,
                             callback=lambda *a: seen.append(a))
        patched = sample_hunyuan(model, noise, prompt, pooled, prompt_mask=mask, steps=3, controller=recorder)
    assert torch.equal(got, expected)
    torch.testing.assert_close(patched, expected, rtol=0, atol=1e-5)  # batch 1: padded text trimmed
    assert [i for i, _ in recorder.steps] == [0, 1, 2] and [s for _, s in recorder.steps] == [x[2] for x in seen]
    assert recorder.steps[0][1] == 1.0


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_cogvideox_matches_pipeline_with_cfg_batch_of_two(kind):
    model = tiny(CogVideoXTransformer3DModel, "cogvideox1.5-tiny", 0)
    g = torch.Generator().manual_seed(5)
    noise = initial_noise((1, 4, 4, 6, 10), 0)
    prompt, negative = torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                             scheduler=cogvideox_scheduler(kind))
    with torch.no_grad():
        expected = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, latents=noise.clone(), height=48,
                        width=80, num_frames=13, num_inference_steps=3, guidance_scale=6.0,
                        generator=torch.Generator().manual_seed(7), output_type="latent").frames
        recorder = StepRecorder()
        got = sample_cogvideox(model, noise, prompt, negative_embeds=negative, steps=3, guidance=6.0,
                               scheduler=kind, seed=7, controller=recorder)
    assert torch.equal(got, expected)
    sigmas = [s for _, s in recorder.steps]
    assert len(sigmas) == 3 and sigmas == sorted(sigmas, reverse=True) and 0 < sigmas[-1] < sigmas[0] <= 1


def test_cogvideox_cfg1_runs_one_batch_1_forward_per_step():
    model = tiny(CogVideoXTransformer3DModel, "cogvideox1.5-tiny", 0)
    prompt = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(5))
    recorder = Recorder()
    with torch.no_grad():
        runs = [sample_cogvideox(model, initial_noise((1, 4, 4, 6, 10), 2), prompt, steps=2, guidance=1.0,
                                 controller=recorder) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and torch.isfinite(runs[0]).all()
    assert {c["shape"] for c in recorder.calls} == {(1, 2, 5 + 30, 16)} and len(recorder.calls) == 2 * 2 * 2


def test_hunyuan_and_cogvideox_bad_inputs_raise():
    hy = tiny(HunyuanVideoTransformer3DModel, "hunyuanvideo-tiny", 0)
    cog = tiny(CogVideoXTransformer3DModel, "cogvideox1.5-tiny", 0)
    with pytest.raises(ValueError, match="prompt_mask"):
        sample_hunyuan(hy, initial_noise((1, 4, 3, 6, 10), 0), torch.zeros(1, 6, 32), torch.zeros(1, 16),
                       prompt_mask=torch.ones(1, 5), steps=1)
    with pytest.raises(ValueError, match="multiple of patch_size_t"):
        sample_cogvideox(cog, initial_noise((1, 3, 4, 6, 10), 0), torch.zeros(1, 5, 32), steps=1, guidance=1.0)
    with pytest.raises(ValueError, match="negative"):
        sample_cogvideox(cog, initial_noise((1, 4, 4, 6, 10), 0), torch.zeros(1, 5, 32), steps=1)
    with pytest.raises(ValueError, match="scheduler must be one of"):
        cogvideox_scheduler("euler")
