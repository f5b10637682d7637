"""Train the testbed model with flow matching on procedural videos.

The convention is diffusers' Wan / UniPC-flow one: sigma = shift*u / (1 + (shift-1)*u) with
u ~ U(0, 1), x_t = (1 - sigma) x0 + sigma noise, the model sees timestep 1000*sigma and predicts
the velocity noise - x0. AdamW on fp32 master weights under bf16 autocast (CUDA), linear warm-up
then cosine decay, gradient clipping, an EMA of the weights (the EMA is what is saved), and a
fraction of prompts dropped to the empty prompt so classifier-free guidance works.

Reproducible: one seed drives the initial weights and every batch. With `--minutes` the step
count is fixed after timing steps calibrate/4 .. calibrate (the first steps are slow: allocator and
kernel warm-up) and written to train_log.json; pass it back as `--steps` to replay the same run.

Continuing: `--init-from DIR` starts from the weights in DIR (a diffusers folder such as
testbed/weights) instead of random ones: fp32 master weights and the EMA both start from them, with
a fresh AdamW, a short warm-up (50 steps unless `--warmup` says otherwise) and the cosine over the
new steps; the EMA decays from the first step (it starts from trained weights). train_log.json
records the sha256 of every file in DIR and the previous train_log.json found there (or in its
parent, train.py's own output layout), and lists all stages under "history"; loss.csv holds the
previous stages' rows followed by this stage's, at global step numbers, with a "stage" column
("seconds" restarts at each stage). Give each stage its own seed, or it replays the same batches.

    python -m sparse_vdit.testbed.train --out runs/testbed --minutes 5 --device cuda
    python -m sparse_vdit.testbed.train --out runs/stage2 --minutes 5 --init-from testbed/weights --seed 1
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from .data import prompt_embeddings, to_device, training_batch
from .model import FLOW_SHIFT, build_model, load_testbed, save_testbed

LOSS_COLUMNS = ["step", "seconds", "loss", "lr", "stage"]
CONTINUE_WARMUP = 50  # the default warm-up of a stage that starts from trained weights


def shifted_sigmas(u: torch.Tensor, shift: float = FLOW_SHIFT) -> torch.Tensor:
    """Map uniform u in [0, 1] to flow sigmas with the Wan shift (more weight on high noise)."""
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(model, videos: torch.Tensor, context: torch.Tensor, generator: torch.Generator,
                       shift: float = FLOW_SHIFT) -> torch.Tensor:
    """Mean squared error of the predicted velocity (noise - x0) at random sigmas shifted by `shift`
    (the sampler's FLOW_SHIFT by default; 1 draws sigma uniformly, weighting low noise, where edges
    form, three times more than shift 3 does near sigma 0)."""
    batch = videos.shape[0]
    u = to_device(torch.rand(batch, generator=generator), videos.device)
    noise = to_device(torch.randn(videos.shape, generator=generator), videos.device)
    sigma = shifted_sigmas(u, shift).view(batch, 1, 1, 1, 1)
    noisy = (1 - sigma) * videos + sigma * noise
    prediction = model(hidden_states=noisy, timestep=sigma.flatten() * 1000, encoder_hidden_states=context, return_dict=False)[0]
    return torch.nn.functional.mse_loss(prediction.float(), noise - videos)


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to 10% of it at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _plain(value):
    """A config value as JSON would give it back (tuples become lists)."""
    return json.loads(json.dumps(value))


def load_init(init_from: str | Path, device: str, config: dict | None = None):
    """The fp32 model in `init_from` and its history: (model, record, previous log, previous loss rows).

    `record` names every file of the folder with its sha256 and the step count it continues from.
    The previous train_log.json / loss.csv are looked up in the folder, then in its parent (train.py
    writes them next to `weights/`); without them the history starts at this stage. Raises
    FileNotFoundError / NotADirectoryError / ValueError naming the problem with the folder."""
    folder = Path(init_from)
    if not folder.exists():
        raise FileNotFoundError(f"--init-from {folder}: no such directory")
    if not folder.is_dir():
        raise NotADirectoryError(f"--init-from {folder}: not a directory (give the diffusers weights folder)")
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"--init-from {folder}: no testbed weights (config.json + *.safetensors) in it")
    try:
        model = load_testbed(folder, device, torch.float32)
    except Exception as error:  # corrupt or missing shards, a config diffusers cannot build
        raise ValueError(f"--init-from {folder}: cannot load the weights: {error}") from error
    if config is not None:
        loaded = {k: _plain(v) for k, v in dict(model.config).items() if k in config}
        wanted = {k: _plain(v) for k, v in config.items()}
        if loaded != wanted:
            diff = sorted(k for k in wanted if loaded.get(k) != wanted[k])
            raise ValueError(f"--init-from {folder}: its architecture differs from the requested config in {diff}")
    previous_log, previous_rows, log_file = None, [], None
    for place in (folder, folder.parent):
        if (place / "train_log.json").is_file():
            log_file = place / "train_log.json"
            try:
                previous_log = json.loads(log_file.read_text())
                int(previous_log["steps"])
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"--init-from {folder}: unreadable {log_file} ({error!r})") from error
            if (place / "loss.csv").is_file():
                with open(place / "loss.csv", newline="") as handle:
                    previous_rows = [[r["step"], r["seconds"], r["loss"], r["lr"], r.get("stage") or 1]
                                     for r in csv.DictReader(handle)]
            break
    if previous_log is None:
        print(f"warning: --init-from {folder}: no train_log.json there or in its parent; "
              "the history recorded starts at this stage", flush=True)
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors") and path.name != "train_log.json":
            files[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    previous_steps = None if previous_log is None else int(previous_log.get("total_steps", previous_log["steps"]))
    record = {
        "dir": str(init_from),
        "files_sha256": files,
        "previous_log": None if log_file is None else str(log_file),
        "previous_steps": previous_steps,
    }
    return model, record, previous_log, previous_rows


def train(
    out: Path,
    *,
    steps: int | None = None,
    minutes: float | None = None,
    batch: int = 32,
    lr: float = 3e-4,
    warmup: int | None = None,
    ema_decay: float = 0.999,
    cond_drop: float = 0.1,
    seed: int = 0,
    device: str = "cuda",
    calibrate: int = 40,
    log_every: int = 25,
    checkpoint_minutes: float = 1.5,
    config: dict | None = None,
    init_from: str | Path | None = None,
    compile: bool = False,
    sigma_shift: float = FLOW_SHIFT,
) -> dict:
    """Train and write `out/weights/` (EMA, bf16 shards), `out/loss.csv` and `out/train_log.json`.

    Exactly one of `steps` (fixed length) and `minutes` (time box) must be given. `warmup` defaults
    to 200 steps, or CONTINUE_WARMUP with `init_from` (a weights folder to continue from; see the
    module doc). `compile` runs the training forward through torch.compile. `sigma_shift` shifts
    the training sigmas (see `flow_matching_loss`; sampling keeps FLOW_SHIFT). Returns the log."""
    if (steps is None) == (minutes is None):
        raise ValueError("give exactly one of steps and minutes")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if minutes is not None and minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if calibrate < 1:
        raise ValueError(f"calibrate must be >= 1 step, got {calibrate}")
    if not sigma_shift > 0:
        raise ValueError(f"sigma_shift must be > 0, got {sigma_shift}")
    if warmup is None:
        warmup = 200 if init_from is None else CONTINUE_WARMUP
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0 steps, got {warmup}")
    out = Path(out)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if init_from is None:
        model, record, previous_log, previous_rows = build_model(config).to(device), None, None, []
    else:  # read everything before `out` is written: out/weights may be the folder itself
        model, record, previous_log, previous_rows = load_init(init_from, device, config)
    offset = (record or {}).get("previous_steps") or 0
    history = [] if previous_log is None else previous_log.get("history") or [previous_log]
    stage = len(history) + 1
    if previous_log is not None and seed in [h.get("seed") for h in history]:
        print(f"warning: seed {seed} was already used by an earlier stage: this stage sees the same batches", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ema_start = warmup if init_from is None else 0  # a random start is not averaged in; trained weights are
    forward = torch.compile(model) if compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    params, ema_params = list(model.parameters()), list(ema.parameters())

    def save() -> None:
        save_testbed(ema, out / "weights")

    start = time.perf_counter()
    deadline = start + 60 * minutes if minutes is not None else math.inf
    total = steps if steps is not None else None
    last_checkpoint = start
    running, rows = 0.0, []
    with open(out / "loss.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LOSS_COLUMNS)
        writer.writerows(previous_rows)
        step = 0
        while total is None or step < total:
            if total is None and step in (calibrate // 4, calibrate):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if step == calibrate // 4:
                    timed_from = time.perf_counter()
                else:  # fix the step count from the rate of the timed steps
                    per_step = (time.perf_counter() - timed_from) / (calibrate - calibrate // 4)
                    total = calibrate + max(0, int((deadline - time.perf_counter()) / per_step * 0.97))
            if time.perf_counter() > deadline:
                break
            videos, prompts = training_batch(batch, generator, device)
            dropped = (torch.rand(batch, generator=generator) < cond_drop).tolist()
            context = prompt_embeddings(["" if d else p for d, p in zip(dropped, prompts)], device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total or 10**9, lr, warmup)
            with autocast:
                loss = flow_matching_loss(forward, videos, context, generator, sigma_shift)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - (ema_decay if step >= ema_start else 0.0))
            running = running + loss.detach()  # no host sync per step: the next batch queues while this one runs
            step += 1
            if step % log_every == 0 or step == total:
                row = [offset + step, round(time.perf_counter() - start, 2), float(running) / (step % log_every or log_every),
                       optimizer.param_groups[0]["lr"], stage]
                writer.writerow(row)
                handle.flush()
                rows.append(row)
                running = 0.0
            if time.perf_counter() - last_checkpoint > 60 * checkpoint_minutes:
                save()
                last_checkpoint = time.perf_counter()
    save()
    log = {
        "steps": step,
        "planned_steps": total,
        "seconds": round(time.perf_counter() - start, 1),
        "batch": batch,
        "lr": lr,
        "warmup": warmup,
        "ema_decay": ema_decay,
        "cond_drop": cond_drop,
        "seed": seed,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
        "torch": torch.__version__,
        "final_loss": rows[-1][2] if rows else None,
        "compile": compile,
        "sigma_shift": sigma_shift,
        "stage": stage,
        "init_from": record,
        "total_steps": offset + step,
    }
    log["history"] = history + [{k: v for k, v in log.items() if k != "history"}]
    (out / "train_log.json").write_text(json.dumps(log, indent=2))
    return log


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int)
    length.add_argument("--minutes", type=float)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, help=f"warm-up steps (default 200, {CONTINUE_WARMUP} with --init-from)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--init-from", type=Path, metavar="DIR",
                        help="continue from the weights in this diffusers folder (e.g. testbed/weights)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward (untested on GPU)")
    parser.add_argument("--sigma-shift", type=float, default=FLOW_SHIFT,
                        help=f"shift of the training sigmas (default {FLOW_SHIFT}, the sampler's; 1 = uniform)")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 matmuls outside autocast
    try:
        log = train(args.out, steps=args.steps, minutes=args.minutes, batch=args.batch, lr=args.lr,
                    warmup=args.warmup, seed=args.seed, device=args.device, init_from=args.init_from,
                    compile=args.compile, sigma_shift=args.sigma_shift)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
