"""The testbed quality harness: PSNR / SSIM against float64 references, warm-up and density
accounting, baseline patterns, and a short harness run (1 prompt x 2 seeds, 2 steps)."""

import math
import types

import numpy as np
import pytest
import torch

from sparse_vdit.strategies.geometry import VideoGeometry
from sparse_vdit.strategies.patterns import Dense, LocalWindow
from sparse_vdit.strategies.strategy import Strategy
from sparse_vdit.testbed import model as M
from sparse_vdit.testbed import quality as Q
from sparse_vdit.testbed import train as T


def test_psnr_matches_numpy():
    x, y = torch.rand(3, 3, 2, 9, 11) * 2 - 1, torch.rand(3, 3, 2, 9, 11) * 2 - 1
    a, b = x.numpy().astype(np.float64), y.numpy().astype(np.float64)
    want = [10 * math.log10(4 / ((a[i] - b[i]) ** 2).mean()) for i in range(3)]
    assert np.allclose(Q.psnr(x, y).numpy(), want)
    assert Q.psnr(x, x).isinf().all()
    with pytest.raises(ValueError, match="shapes differ"):
        Q.psnr(x, y[:2])


def _ssim_brute(a: np.ndarray, b: np.ndarray) -> float:
    """Direct SSIM over every 7x7 window of every 2D slice, float64."""
    r = np.arange(7) - 3.0
    w1 = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(w1, w1) / np.outer(w1, w1).sum()
    c1, c2 = 0.02**2, 0.06**2
    values = []
    for sa, sb in zip(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])):
        for i in range(sa.shape[0] - 6):
            for j in range(sa.shape[1] - 6):
                pa, pb = sa[i : i + 7, j : j + 7], sb[i : i + 7, j : j + 7]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
                cov = (w * pa * pb).sum() - ma * mb
                values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_matches_a_brute_force_window_loop():
    x = torch.rand(2, 3, 2, 9, 10) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    got = Q.ssim(x, y)
    for i in range(2):
        assert got[i].item() == pytest.approx(_ssim_brute(x[i].double().numpy(), y[i].double().numpy()), abs=1e-9)
    assert torch.allclose(Q.ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(Q.ssim(x, y), Q.ssim(y, x))
    with pytest.raises(ValueError, match="H, W >= 7"):
        Q.ssim(x[..., :5, :], y[..., :5, :])


def test_mean_se():
    values = torch.randn(20, dtype=torch.float64)
    mean, se = Q.mean_se(values)
    assert mean == pytest.approx(values.mean().item()) and se == pytest.approx(np.std(values.numpy(), ddof=1) / math.sqrt(20))
    assert Q.mean_se(torch.tensor([2.0])) == (2.0, 0.0)
    with pytest.raises(ValueError, match="no values"):
        Q.mean_se(torch.tensor([]))


def test_warmup_makes_exactly_the_first_steps_dense():
    sigmas = Q.sampling_sigmas(8)
    assert len(sigmas) == 8 and sigmas[0] == pytest.approx(1.0, abs=1e-5) and sigmas == sorted(sigmas, reverse=True)
    heads = [[LocalWindow(1, 0.25, 0.25)] * 2 for _ in range(3)]
    for warmup in range(0, 9):
        strategy = Q.uniform_strategy(heads, sigmas, warmup)
        dense_steps = [all(strategy.patterns_for(s, layer) is None for layer in range(3)) for s in sigmas]
        assert dense_steps == [True] * warmup + [False] * (8 - warmup)
    with pytest.raises(ValueError, match="warmup 9"):
        Q.warmup_threshold(sigmas, 9)


@pytest.mark.parametrize("target", [0.05, 0.12, 0.3])
def test_baseline_patterns_reach_their_density(target):
    geom = VideoGeometry(frames=9, height=16, width=16)
    for name in Q.BASELINES:
        table = Q.baseline_patterns(name, target, geom, layers=3, heads=4)
        densities = [p.density(geom) for layer in table for p in layer]
        assert len(table) == 3 and all(len(layer) == 4 for layer in table)
        assert abs(np.mean(densities) - target) < 0.35 * target, (name, np.mean(densities))
    random_a = Q.baseline_patterns("random", target, geom, 3, 4, seed=1)
    assert random_a == Q.baseline_patterns("random", target, geom, 3, 4, seed=1)
    assert len({p for layer in random_a for p in layer}) > 1
    with pytest.raises(ValueError, match="unknown baseline"):
        Q.baseline_patterns("stripes", target, geom, 3, 4)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("q")
    config = dict(M.model_config(), num_attention_heads=2, attention_head_dim=16, ffn_dim=32, num_layers=2, freq_dim=32)
    T.train(out, steps=2, batch=1, device="cpu", config=config, warmup=1)
    return out / "weights"


@pytest.fixture(scope="module")
def harness(tiny_weights):
    return Q.Harness(M.load_testbed(tiny_weights), ["small red circle moving left"], seeds=(0, 1), steps=1)


def test_short_harness_run(harness):
    floor = harness.floor()
    assert math.isfinite(floor.psnr[0]) and floor.psnr[1] == 0.0  # one prompt: one seed pair
    rows = Q.run_baselines(harness, names=("local_window",), densities=(0.1,), warmups=(0, 1), log=lambda _: None)
    cold, warm = (r.score for r in rows)
    assert 0.05 < cold.sparse_density < 0.2 and cold.density == pytest.approx(cold.sparse_density)
    assert math.isfinite(cold.psnr[0]) and cold.psnr[0] > floor.psnr[0] and cold.ssim[0] < 1
    assert warm.psnr[0] == math.inf and warm.density == 1.0  # the one step ran dense: identical videos
    text = Q.baselines_markdown(harness, rows, floor, command="cmd", device="cpu", seconds=1.0)
    assert "Floor" in text and "Incomplete run" in text and text.count("| local_window |") == 3
    assert Q.best_warmups(rows)[0].warmup == 1


def test_page_names_what_a_cut_off_run_lacks():
    floor = Q.Score(1.0, 1.0, (16.0, 0.5), (0.3, 0.01))
    score = Q.Score(0.5, 0.1, (13.0, 0.2), (0.2, 0.01))
    rows = [Q.BaselineRow(name, target, warmup, score) for name in Q.BASELINES[:-1]
            for target in Q.TARGET_DENSITIES for warmup in Q.warmups_for(3)]
    rows = rows[:-1] + [Q.BaselineRow(Q.BASELINES[-1], Q.TARGET_DENSITIES[0], 2, score)]  # last group cut
    long_run = types.SimpleNamespace(steps=3, prompts=["p", "p"], n_seeds=2, guidance=3.0)
    text = Q.baselines_markdown(long_run, rows, floor, command="cmd", device="cpu", seconds=1.0)
    cut_name, cut_target = Q.BASELINES[-2], Q.TARGET_DENSITIES[-1]
    assert f"{cut_name} at {cut_target:g} has warm-ups 0, 1 of 0, 1, 2" in text
    assert f"{Q.BASELINES[-1]} at {Q.TARGET_DENSITIES[1]:g} has warm-ups none of 0, 1, 2" in text
    assert f"{Q.BASELINES[-1]} at {Q.TARGET_DENSITIES[0]:g} has warm-ups 2 of 0, 1, 2" in text
    assert "no rows for" not in text
    complete = rows[:-1] + [Q.BaselineRow(cut_name, cut_target, 2, score)] + [
        Q.BaselineRow(Q.BASELINES[-1], t, w, score) for t in Q.TARGET_DENSITIES for w in Q.warmups_for(3)]
    assert "Incomplete run" not in Q.baselines_markdown(long_run, complete, floor, command="cmd", device="cpu",
                                                        seconds=1.0)


def test_harness_rejects_a_strategy_of_another_shape(harness):
    with pytest.raises(ValueError, match="strategy is 3x2"):
        harness.score(Strategy.uniform(Dense(), 3, 2))
    with pytest.raises(ValueError, match="two seeds"):
        Q.Harness(harness.model, ["small red circle moving left"], seeds=(0,), steps=1)


def test_command_scores_only_the_named_baselines(tiny_weights, tmp_path, capsys):
    page = tmp_path / "testbed.md"
    Q.main(["--baselines", "--weights", str(tiny_weights), "--prompts", "1", "--steps", "1", "--only", "random",
            "--out", str(page)])
    text = page.read_text()
    assert text.count("| random |") == 2 * len(Q.TARGET_DENSITIES)  # best-warm-up table and every run
    assert "no rows for diagonal, multi_diagonal, local_window, radial" in text
    assert "--only random" in text  # the page names the command that wrote it
    with pytest.raises(SystemExit):
        Q.main(["--baselines", "--weights", str(tiny_weights), "--only", "random,stripes", "--out", str(page)])
    assert "unknown baseline(s) ['stripes']" in capsys.readouterr().err
