"""The testbed model config, saving/loading, training loop, sampling and per-head statistics."""

import csv
import json
import math

import pytest
import torch

from sparse_vdit.adapters.common import DenseController
from sparse_vdit.strategies.geometry import VideoGeometry
from sparse_vdit.testbed import model as M
from sparse_vdit.testbed import train as T
from sparse_vdit.testbed.generate import generate
from sparse_vdit.testbed.head_stats import STATS, HeadStatistics, stats_markdown


def tiny_config():
    return dict(M.model_config(), num_attention_heads=2, attention_head_dim=16, ffn_dim=32, num_layers=2, freq_dim=32)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    log = T.train(out, steps=3, batch=2, device="cpu", config=tiny_config(), log_every=2, warmup=2)
    return out, log


def test_shipped_config_meets_the_brief():
    cfg = M.model_config()
    assert cfg["num_layers"] >= 6 and cfg["num_attention_heads"] >= 4 and cfg["attention_head_dim"] == 128
    assert cfg["text_dim"] == 4096 and cfg["freq_dim"] == 256  # what ComfyUI's Wan loader assumes
    geom = M.testbed_geometry()
    assert geom == VideoGeometry(frames=9, height=16, width=16) and geom.tokens_per_frame >= 256


def test_shifted_sigmas_match_the_wan_formula():
    u = torch.rand(100, dtype=torch.float64)
    expected = 3.0 * u / (1 + 2.0 * u)
    assert torch.allclose(T.shifted_sigmas(u), expected)
    assert T.shifted_sigmas(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    assert T.learning_rate(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert T.learning_rate(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert T.learning_rate(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert T.learning_rate(100, 100, 1.0, 10) == pytest.approx(0.1)
    mids = [T.learning_rate(s, 100, 1.0, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(mids, mids[1:]))


@pytest.mark.parametrize("shift", [None, 1.0, 5.0])
def test_flow_matching_loss_is_the_velocity_mse(shift):
    # at the sampler's shift by default, or at the training shift asked for (1: sigma = u)
    torch.manual_seed(0)
    model = M.build_model(tiny_config())
    videos = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    context = torch.randn(2, 8, 4096)
    extra = () if shift is None else (shift,)
    loss = T.flow_matching_loss(model, videos, context, torch.Generator().manual_seed(3), *extra)
    g = torch.Generator().manual_seed(3)
    u, noise = torch.rand(2, generator=g), torch.randn(videos.shape, generator=g)
    s = 3.0 if shift is None else shift
    sigma = (s * u / (1 + (s - 1) * u)).view(2, 1, 1, 1, 1)
    pred = model(hidden_states=(1 - sigma) * videos + sigma * noise, timestep=sigma.flatten() * 1000,
                 encoder_hidden_states=context, return_dict=False)[0]
    expected = ((pred.double() - (noise - videos).double()) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_training_sigma_shift_reaches_the_loss_and_the_log(tmp_path, monkeypatch):
    shifts = []
    real_loss = T.flow_matching_loss
    monkeypatch.setattr(T, "flow_matching_loss", lambda *a: shifts.append(a[4]) or real_loss(*a))
    log = T.train(tmp_path, steps=2, batch=1, device="cpu", config=tiny_config(), warmup=1, sigma_shift=1.0)
    assert shifts == [1.0, 1.0] and log["sigma_shift"] == 1.0
    for bad in (0.0, -2.0, float("nan")):
        with pytest.raises(ValueError, match="sigma_shift must be > 0"):
            T.train(tmp_path / "bad", steps=1, device="cpu", config=tiny_config(), sigma_shift=bad)


def test_training_writes_weights_curve_and_log(tiny_run):
    out, log = tiny_run
    assert log["steps"] == 3 and math.isfinite(log["final_loss"])
    rows = list(csv.DictReader((out / "loss.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [2, 3]
    assert json.loads((out / "train_log.json").read_text())["steps"] == 3
    model = M.load_testbed(out / "weights")
    assert model.config.num_layers == 2 and next(model.parameters()).dtype == torch.float32


def test_training_is_reproducible(tiny_run, tmp_path):
    out, _ = tiny_run
    T.train(tmp_path, steps=3, batch=2, device="cpu", config=tiny_config(), log_every=2, warmup=2)
    losses = lambda d: [r["loss"] for r in csv.DictReader((d / "loss.csv").read_text().splitlines())]  # noqa: E731
    assert losses(out) == losses(tmp_path)
    a, b = M.load_testbed(out / "weights"), M.load_testbed(tmp_path / "weights")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_time_boxed_training_stops(tmp_path):
    log = T.train(tmp_path, minutes=0.0005, batch=1, device="cpu", config=tiny_config(), calibrate=8, warmup=1)
    assert log["steps"] < 8 and log["planned_steps"] is None and (tmp_path / "weights" / "config.json").is_file()


def test_time_box_fixes_the_step_count_after_calibrating(tmp_path, monkeypatch):
    clock = iter(range(10**6))
    monkeypatch.setattr(T.time, "perf_counter", lambda: 0.1 * next(clock))  # every reading 0.1 s later
    log = T.train(tmp_path, minutes=0.02, batch=1, device="cpu", config=tiny_config(), calibrate=2, warmup=1)
    assert log["planned_steps"] is not None and 2 < log["steps"] == log["planned_steps"] < 12


@pytest.mark.parametrize("kwargs, match", [({}, "exactly one"), ({"steps": 2, "minutes": 1.0}, "exactly one"),
                                           ({"steps": 0}, "steps"), ({"minutes": -1.0}, "minutes"),
                                           ({"steps": 1, "batch": 0}, "batch"),
                                           ({"steps": 1, "calibrate": 0}, "calibrate")])
def test_training_rejects_bad_lengths(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        T.train(tmp_path, device="cpu", config=tiny_config(), **kwargs)


def test_missing_weights_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="no testbed weights"):
        M.load_testbed(tmp_path)


def test_shards_stay_under_16_mib(tmp_path):
    torch.manual_seed(0)
    model = M.build_model(dict(tiny_config(), num_attention_heads=4, attention_head_dim=128, num_layers=3, ffn_dim=1024))
    M.save_testbed(model, tmp_path)
    shards = list(tmp_path.glob("*.safetensors"))
    assert len(shards) >= 2 and all(s.stat().st_size < 16 * 2**20 for s in shards)
    loaded = M.load_testbed(tmp_path)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.to(torch.bfloat16).float()), name


def test_generate_is_seeded_and_controller_transparent(tiny_run):
    model = M.load_testbed(tiny_run[0] / "weights")
    prompts = ["small red circle moving left", "large blue cross spinning"]
    a = generate(model, prompts, [0, 1], steps=1)
    assert a.shape == (2, 3, 9, 32, 32) and a.abs().max() <= 1
    assert torch.equal(a, generate(model, prompts, [0, 1], steps=1, controller=DenseController()))
    assert not torch.allclose(a[1], generate(model, prompts[1:], [2], steps=1)[0])
    with pytest.raises(ValueError, match="seeds"):
        generate(model, prompts, [0], steps=1)


def _reference_stats(q, k, geom, rows):
    """float64 brute force of the five statistics for one (batch, head) over the given query rows."""
    q, k = q.double(), k.double()
    P, W, L = geom.tokens_per_frame, geom.width, geom.grid_tokens
    coords = [(g // P, (g % P) // W, g % P % W) for g in range(L)]
    probs = torch.softmax(q[rows] @ k.T / math.sqrt(q.shape[-1]), -1)
    sums = [0.0, 0.0, 0.0]
    entropy = 0.0
    for i, r in enumerate(rows):
        fq, yq, xq = coords[r]
        for j in range(L):
            fk, yk, xk = coords[j]
            p = probs[i, j].item()
            sums[0] += p if abs(fq - fk) <= 1 and abs(yq - yk) <= 2 and abs(xq - xk) <= 2 else 0
            sums[1] += p if fq == fk else 0
            sums[2] += p if fq != fk and abs(yq - yk) <= 1 and abs(xq - xk) <= 1 else 0
            entropy -= p * math.log(p)
    n = len(rows)
    received = probs.mean(0)
    top = max(1, round(0.02 * L))
    columns = received.sort(descending=True).values[:top].sum().item()
    return [sums[0] / n, sums[1] / n, sums[2] / n, columns, entropy / n / math.log(L)]


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_head_statistics_match_a_float64_brute_force(layout):
    geom = VideoGeometry(frames=3, height=5, width=7)
    L = geom.grid_tokens
    q, k, v = (torch.randn(2, 2, L, 8) * 2 for _ in range(3))
    recorder = HeadStatistics(layers=2, heads=2, query_stride=4)
    dense_out = torch.randn(1)
    args = (q, k, v) if layout == "bhld" else tuple(t.transpose(1, 2) for t in (q, k, v))
    out = recorder.attention(*args, layer=1, sigma=0.5, geometry=geom, layout=layout, dense=lambda *a: dense_out)
    assert out is dense_out
    recorder.attention(*args, layer=0, sigma=0.5, geometry=geom, layout=layout, dense=lambda *a: dense_out)
    centre = (geom.frames // 2) * geom.tokens_per_frame + (geom.height // 2) * geom.width + geom.width // 2
    rows = sorted(set(range(0, L, 4)) | {centre})
    table = recorder.table()
    for h in range(2):
        expected = torch.tensor([_reference_stats(q[b, h], k[b, h], geom, rows) for b in range(2)]).mean(0)
        assert torch.allclose(table[1, h], expected.double(), atol=1e-5), (h, table[1, h], expected)
    maps = recorder.maps()
    scores = torch.einsum("bd,bld->bl", q[:, 0, centre].double(), k[:, 0].double()) / math.sqrt(8)
    want = torch.softmax(scores, -1).mean(0)
    assert torch.allclose(maps[1, 0].flatten(), want, atol=1e-6)
    assert stats_markdown(table).count("\n") == 2 + 4 and all(s in stats_markdown(table) for s in STATS)


def test_head_statistics_reject_bad_input():
    geom = VideoGeometry(frames=2, height=4, width=4)
    q = torch.randn(1, 2, geom.grid_tokens, 8)
    recorder = HeadStatistics(layers=1, heads=2)
    with pytest.raises(ValueError, match="layer 3"):
        recorder.attention(q, q, q, layer=3, sigma=1.0, geometry=geom, layout="bhld", dense=None)
    with pytest.raises(ValueError, match="expected 3"):
        HeadStatistics(1, 3).attention(q, q, q, layer=0, sigma=1.0, geometry=geom, layout="bhld", dense=None)
    with pytest.raises(ValueError, match="layout"):
        recorder.attention(q, q, q, layer=0, sigma=1.0, geometry=geom, layout="lbhd", dense=None)
    with pytest.raises(ValueError, match="no attention call"):
        recorder.table()


def test_shipped_weights_load_and_fit_the_limits():
    shards = sorted(M.WEIGHTS_DIR.glob("*.safetensors"))
    assert shards and all(s.stat().st_size < 16 * 2**20 for s in shards)
    assert sum(s.stat().st_size for s in shards) <= 48e6
    model = M.load_testbed()
    shipped = {k: v for k, v in dict(model.config).items() if k in M.model_config()}
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in shipped.items()} == M.model_config()
    assert all(torch.isfinite(p).all() for p in model.parameters())
