"""Continuing testbed training from saved weights (train.py --init-from), and --compile, on CPU."""

import csv
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from sparse_vdit.testbed import model as M
from sparse_vdit.testbed import train as T
from sparse_vdit.testbed.report import loss_curve_image


def tiny_config():
    return dict(M.model_config(), num_attention_heads=2, attention_head_dim=16, ffn_dim=32, num_layers=2, freq_dim=32)


def file_weights(folder):
    """The tensors stored in a weights folder, as fp32."""
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update({k: v.float() for k, v in load_file(shard).items()})
    return tensors


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    T.train(out, steps=3, batch=2, device="cpu", config=tiny_config(), log_every=2, warmup=2)
    return out


def test_init_from_starts_from_exactly_the_files(stage1, tmp_path, monkeypatch):
    stored = file_weights(stage1 / "weights")
    seen = []
    real_loss = T.flow_matching_loss

    def spy(model, *args):
        if not seen:
            seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_loss(model, *args)

    monkeypatch.setattr(T, "flow_matching_loss", spy)
    # lr 0: the step changes nothing, so what is saved is the EMA's start, which must be the files too
    T.train(tmp_path, steps=1, batch=1, lr=0.0, device="cpu", init_from=stage1 / "weights", seed=1)
    first = seen[0]
    assert first.keys() == stored.keys()
    for name, value in stored.items():
        assert first[name].dtype == torch.float32 and torch.equal(first[name], value), name
    saved = file_weights(tmp_path / "weights")
    assert all(torch.equal(saved[name], value) for name, value in stored.items())


def test_training_continues_and_records_the_history(stage1, tmp_path):
    log = T.train(tmp_path, steps=2, batch=2, device="cpu", init_from=stage1 / "weights", seed=1, log_every=1)
    assert log["steps"] == 2 and log["total_steps"] == 5 and log["stage"] == 2 and log["warmup"] == T.CONTINUE_WARMUP
    record = log["init_from"]
    assert record["previous_steps"] == 3 and record["previous_log"] == str(stage1 / "train_log.json")
    files = sorted(p.name for p in (stage1 / "weights").iterdir() if p.suffix in (".json", ".safetensors"))
    assert sorted(record["files_sha256"]) == files
    for name, digest in record["files_sha256"].items():
        assert hashlib.sha256((stage1 / "weights" / name).read_bytes()).hexdigest() == digest
    assert [h["stage"] for h in log["history"]] == [1, 2] and [h["seed"] for h in log["history"]] == [0, 1]
    assert log["history"][0]["init_from"] is None and log["history"][1]["init_from"] == record
    assert json.loads((tmp_path / "train_log.json").read_text()) == log

    rows = list(csv.DictReader((tmp_path / "loss.csv").read_text().splitlines()))
    assert [(int(r["step"]), int(r["stage"])) for r in rows] == [(2, 1), (3, 1), (4, 2), (5, 2)]
    assert rows[:2] == [dict(r, stage="1") for r in csv.DictReader((stage1 / "loss.csv").read_text().splitlines())]
    assert float(rows[2]["lr"]) == pytest.approx(3e-4 / T.CONTINUE_WARMUP)  # a fresh warm-up
    assert loss_curve_image(tmp_path / "loss.csv").size == (480, 240)

    before, after = file_weights(stage1 / "weights"), file_weights(tmp_path / "weights")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained

    third = T.train(tmp_path / "s3", steps=1, batch=1, device="cpu", init_from=tmp_path / "weights", seed=2)
    assert third["stage"] == 3 and third["total_steps"] == 6 and len(third["history"]) == 3


def test_init_from_the_shipped_weights_reads_their_history():
    model, record, previous, rows = T.load_init(M.WEIGHTS_DIR, "cpu")
    shipped = json.loads((M.WEIGHTS_DIR / "train_log.json").read_text())
    # the shipped weights may be any stage: their record counts every stage's steps
    assert previous == shipped and record["previous_steps"] == shipped.get("total_steps", shipped["steps"])
    assert record["previous_log"] == str(M.WEIGHTS_DIR / "train_log.json")
    assert len(rows) == len(list(csv.DictReader((M.WEIGHTS_DIR / "loss.csv").read_text().splitlines()))) and int(rows[-1][4]) == shipped.get("stage", 1)
    assert len([n for n in record["files_sha256"] if n.endswith(".safetensors")]) == len(list(M.WEIGHTS_DIR.glob("*.safetensors")))
    assert next(model.parameters()).dtype == torch.float32


def test_bad_init_dir_gives_a_clear_error(stage1, tmp_path, capsys):
    kw = dict(steps=1, batch=1, device="cpu")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        T.train(tmp_path / "out", init_from=tmp_path / "missing", **kw)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        T.train(tmp_path / "out", init_from=tmp_path / "file", **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no testbed weights"):
        T.train(tmp_path / "out", init_from=tmp_path / "empty", **kw)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((stage1 / "weights" / "config.json").read_text())
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot load the weights"):
        T.train(tmp_path / "out", init_from=broken, **kw)
    with pytest.raises(ValueError, match=r"architecture differs .*num_layers"):
        T.train(tmp_path / "out", init_from=stage1 / "weights", config=dict(tiny_config(), num_layers=3), **kw)
    assert not (tmp_path / "out").exists()  # nothing written before the weights loaded

    with pytest.raises(SystemExit) as exit_info:
        T.main(["--out", str(tmp_path / "out"), "--steps", "1", "--device", "cpu", "--init-from", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "no such directory" in capsys.readouterr().err


def test_compiled_training_runs_on_cpu(tmp_path):
    kw = dict(steps=1, batch=1, device="cpu", config=tiny_config(), warmup=1, log_every=1)
    plain = T.train(tmp_path / "plain", **kw)
    compiled = T.train(tmp_path / "compiled", compile=True, **kw)
    assert compiled["compile"] is True and compiled["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-4)
