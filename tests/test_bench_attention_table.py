"""bench/attention.py off the GPU: --table-from (the table of a run cut by a timeout, rebuilt from its
log), the forced kernel choices of each flag, and the flags themselves."""

import json

import pytest
import torch

from sparse_vdit.bench import attention


def test_table_from_a_log_keeps_every_row_and_skips_other_lines(tmp_path, capsys):
    rows = [dict(shape="S", L=10, H=2, D=64, variant="cuDNN SDPA", ms=10.0, token_density=1.0, tile_density=1.0,
                 flex_ms=None, err=None, note="", efficiency=None, tflops=500.0),
            dict(shape="S", L=10, H=2, D=64, variant="diagonal 0.1 128x64", ms=2.0, token_density=0.1,
                 tile_density=0.11, flex_ms=3.0, err=2e-3, note="plan 1 ms", efficiency=0.5, tflops=250.0)]
    log = tmp_path / "attention_log.txt"
    log.write_text("2026-11-29 15:32:43 NVIDIA H200 torch 2.11 triton 3.6\n"
                   + "".join(json.dumps(r) + "\n" for r in rows) + "Traceback (most recent call last):\n")
    assert attention.rows_from_log(str(log)) == rows
    attention.main(["--table-from", str(log)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| S |")]
    assert len(lines) == 2
    cells = [c.strip() for c in lines[1].split("|")[1:-1]]
    assert cells[1] == "diagonal 0.1 128x64" and cells[4] == "2.00" and cells[7] == "5.00"  # 10 ms / 2 ms
    assert cells[9] == "1.50"  # Flex / ours


def test_env_set_restores_the_variable(monkeypatch):
    import os


    from sparse_vdit.bench.attention import env_set

    monkeypatch.delenv("SPARSE_VDIT_MERGED_CUBE", raising=False)
    with env_set("SPARSE_VDIT_MERGED_CUBE", "only"):
        assert os.environ["SPARSE_VDIT_MERGED_CUBE"] == "only"
    assert "SPARSE_VDIT_MERGED_CUBE" not in os.environ
    monkeypatch.setenv("SPARSE_VDIT_MERGED_CUBE", "1")
    try:
        with env_set("SPARSE_VDIT_MERGED_CUBE", "0"):
            raise RuntimeError("a failing timing")
    except RuntimeError:
        pass
    assert os.environ["SPARSE_VDIT_MERGED_CUBE"] == "1"


def test_forced_choices_follow_the_flags_and_the_tables():
    from sparse_vdit.kernels import rule as R
    from sparse_vdit.kernels import tables_from_rules

    cube = tables_from_rules([R.make_rule(order=R.CUBE, win=(1, 2, 2))], 0, 3, 16, 16, 768, 64, 64)
    band = tables_from_rules([R.make_rule(diag=40)], 0, 3, 16, 16, 768, 64, 64)
    assert attention.forced_choices(band, cube_walks=True, paired_tiles=False) == []
    assert [c[2] for c in attention.forced_choices(cube, True, False)] == ["loop per run", "merged walk"]
    assert attention.forced_choices(band, True, True) == [("SPARSE_VDIT_PAIRED_TILES", "0", "single tiles"),
                                                          ("SPARSE_VDIT_PAIRED_TILES", "only", "paired tiles")]
    assert [c[0] for c in attention.forced_choices(cube, True, True)] == ["SPARSE_VDIT_MERGED_CUBE"] * 2 + [
        "SPARSE_VDIT_PAIRED_TILES"] * 2
    assert attention.forced_choices(band, False, False, gluon=("ws", "0")) == [("SPARSE_VDIT_GLUON", "0", "triton"),
                                                                             ("SPARSE_VDIT_GLUON", "ws", "gluon ws")]
    assert attention.forced_choices(band, False, False, gluon=("0", "1", "r128", "ws")) == [
        ("SPARSE_VDIT_GLUON", "0", "triton"), ("SPARSE_VDIT_GLUON", "1", "gluon"),
        ("SPARSE_VDIT_GLUON", "r128", "gluon r128"), ("SPARSE_VDIT_GLUON", "ws", "gluon ws")]
    assert attention.forced_choices(band, False, False, gluon=("0",), fast_start=True) == [
        ("SPARSE_VDIT_GLUON", "0", "triton"), ("SPARSE_VDIT_GLUON_FAST_START", "0", "walk start"),
        ("SPARSE_VDIT_GLUON_FAST_START", "1", "fast start")]


def test_unknown_gluon_modes_are_refused():
    with pytest.raises(SystemExit, match=r"unknown --gluon modes \['r64'\]"):
        attention.main(["--gluon", "0,r64"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the flags up to the GPU check")
def test_the_gpu_session_flags_parse():
    # bench/gpu_session.sh passes these (GS_FLAGS, GS_DENSITIES, GS_*_FAMILIES); a typo would cost a GPU call
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        attention.main(["--shapes", "cogvideox", "--densities", "0.1,0.3,0.5", "--families", "local_window",
                        "--baselines", "cudnn", "--flex-shapes", "", "--gluon", "0", "--fast-start"])
