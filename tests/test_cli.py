"""The sparse-vdit command line at tiny size: run, search, info, select, bad files."""

import json

import pytest

from sparse_vdit.cli import main
from sparse_vdit.strategies.file import load_strategy


@pytest.fixture(scope="module")
def run_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["run", "--tiny", "--steps", "2", "--rows", "16", "--target-speedup", "1.5", "--out", str(out)]) == 0
    return out


def test_run_writes_samples_strategy_and_report(run_out):
    for name in ("dense.gif", "sparse.gif", "strip.png", "strategy.safetensors", "report.json", "report.md"):
        assert (run_out / name).stat().st_size > 0, name
    report = json.loads((run_out / "report.json").read_text())
    assert 0.0 < report["density"] <= 1.0
    assert report["psnr_db"] > 0 and -1.0 <= report["ssim"] <= 1.0
    assert report["predicted_attention_speedup"] >= 1.5 * (1 - 1e-9)
    assert report["dense_run_s"] > 0 and report["search_s"] > 0 and report["sparse_run_s"] > 0
    s = load_strategy(run_out / "strategy.safetensors")
    assert s.layers == 2 and s.heads == 2 and s.meta["model"]["variant"] == "testbed-tiny"
    assert s.meta["record"] is not None and len(s.meta["schedule"]["sigmas"]) == 2


def test_info_and_select(run_out, tmp_path, capsys):
    path = run_out / "strategy.safetensors"
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "2 layers x 2 heads" in text and "layer   1" in text and "predicted attention speedup" in text
    same = tmp_path / "same.safetensors"
    assert main(["select", str(path), "--target-speedup", "1.5", "-o", str(same)]) == 0
    assert load_strategy(same).patterns == load_strategy(path).patterns
    faster = tmp_path / "faster.safetensors"
    assert main(["select", str(path), "--target-speedup", "3", "-o", str(faster)]) == 0
    assert load_strategy(faster).meta["search"]["predicted_speedup"] >= 3 * (1 - 1e-9)


def test_search_command(tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    assert main(["search", "--tiny", "--steps", "2", "--rows", "8", "-o", str(out)]) == 0
    assert "predicted attention speedup" in capsys.readouterr().out
    assert load_strategy(out).meta["search"]["target_speedup"] == 2.0


def test_bad_files_exit_2_with_the_message(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    assert main(["info", str(bad)]) == 2
    assert "not a strategy file" in capsys.readouterr().err
    assert main(["select", str(tmp_path / "missing.safetensors"), "--target-speedup", "2", "-o",
                 str(tmp_path / "o.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["select", str(bad), "-o", "x"])  # a budget is required
