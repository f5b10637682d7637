"""After training: sample strips and per-head attention statistics of the testbed model.

    python -m sparse_vdit.testbed.report --weights testbed/weights --out docs/img

writes samples_heldout.png and samples_train.png (sampled), data_heldout.png (the procedural
videos of the same prompts, for comparison), attention_maps.png, head_stats.md and
head_stats.json (statistics over the held-out samples; see head_stats.py; the json also counts
the samples whose colour, motion and shape match their prompt, see adherence.py), and with
`--loss-csv` the training curve as loss_curve.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import torch

from .adherence import check_videos
from .data import HELD_OUT, Prompt, render_videos
from .generate import SAMPLE_STEPS, generate
from .head_stats import STATS, HeadStatistics, maps_image, stats_markdown
from .model import WEIGHTS_DIR, load_testbed
from .strips import save_strip

TRAIN_SAMPLE_PROMPTS = tuple(
    Prompt.parse(text)
    for text in (
        "small red circle moving up",
        "large green square spinning",
        "small blue cross moving left",
        "large yellow square bouncing",
        "small cyan cross moving down",
        "large magenta triangle moving right",
        "large blue circle bouncing",
        "small green triangle spinning",
    )
)


def write_report(model, out: Path, seed: int = 0, steps: int = SAMPLE_STEPS) -> dict:
    """Sample, measure and write the report files into `out`; returns the statistics summary."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    recorder = HeadStatistics(cfg.num_layers, cfg.num_attention_heads)
    held = [p.text for p in HELD_OUT]
    videos = generate(model, held, [seed] * len(held), steps=steps, controller=recorder)
    save_strip(out / "samples_heldout.png", videos, held)
    adherence = {"heldout": check_videos(videos, held)}
    save_strip(out / "data_heldout.png", render_videos(held, torch.Generator().manual_seed(seed)), held)
    train = [p.text for p in TRAIN_SAMPLE_PROMPTS]
    train_videos = generate(model, train, [seed] * len(train), steps=steps)
    save_strip(out / "samples_train.png", train_videos, train)
    adherence["train"] = check_videos(train_videos, train)
    table = recorder.table()
    maps_image(recorder.maps()).save(out / "attention_maps.png")
    (out / "head_stats.md").write_text(stats_markdown(table))
    spread = {name: [round(float(table[..., i].min()), 3), round(float(table[..., i].max()), 3)] for i, name in enumerate(STATS)}
    summary = {
        "stats": list(STATS),
        "table": table.tolist(),
        "min_max_over_heads": spread,
        "adherence": {
            split: {"videos": len(results), "colour_right": sum(r.colour_right for r in results),
                    "motion_right": sum(bool(r.motion_right) for r in results),
                    "shape_right": sum(bool(r.shape_right) for r in results)}
            for split, results in adherence.items()
        },
    }
    (out / "head_stats.json").write_text(json.dumps(summary, indent=1))
    return summary


def loss_curve_image(csv_path: str | Path, width: int = 480, height: int = 240):
    """A PIL line plot of loss.csv (log-scale loss against step), with min/max loss labels.

    A loss.csv of continued training (train.py --init-from) holds every stage at global step
    numbers with a "stage" column; each later stage's start is marked by a grey vertical line."""
    from PIL import Image, ImageDraw

    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if len(rows) < 2:
        raise ValueError(f"{csv_path}: need at least two logged steps to plot")
    steps = [int(r["step"]) for r in rows]
    logs = [math.log10(float(r["loss"])) for r in rows]
    stages = [int(r.get("stage") or 1) for r in rows]
    lo, hi = min(logs), max(logs)
    margin = 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    x = lambda s: margin + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (width - 2 * margin)  # noqa: E731
    y = lambda v: height - margin - (v - lo) / max(hi - lo, 1e-9) * (height - 2 * margin)  # noqa: E731
    draw.rectangle([margin, margin, width - margin, height - margin], outline=(160, 160, 160))
    for i in range(1, len(rows)):
        if stages[i] != stages[i - 1]:  # the new stage starts after the previous stage's last step
            draw.line([(x(steps[i - 1]), margin), (x(steps[i - 1]), height - margin)], fill=(150, 150, 150), width=1)
            draw.text((x(steps[i - 1]) + 3, margin + 2), f"stage {stages[i]}", fill=(90, 90, 90))
    draw.line([(x(s), y(v)) for s, v in zip(steps, logs)], fill=(200, 30, 30), width=2)
    draw.text((2, margin - 12), f"loss {10 ** hi:.3g}", fill=(0, 0, 0))
    draw.text((2, height - margin + 2), f"loss {10 ** lo:.3g} (log scale)", fill=(0, 0, 0))
    draw.text((width - margin - 60, height - margin + 14), f"step {steps[-1]}", fill=(0, 0, 0))
    return image


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=SAMPLE_STEPS)
    parser.add_argument("--loss-csv", type=Path, help="also plot this loss.csv as loss_curve.png")
    args = parser.parse_args(argv)
    summary = write_report(load_testbed(args.weights, args.device), args.out, steps=args.steps)
    if args.loss_csv is not None:
        loss_curve_image(args.loss_csv).save(args.out / "loss_curve.png")
    print(json.dumps({k: summary[k] for k in ("min_max_over_heads", "adherence")}))


if __name__ == "__main__":
    main()
