"""After training: sample strips and per-head attention statistics of the testbed model.

    python -m sparse_vdit.testbed.report --weights testbed/weights --out docs/img

writes samples_heldout.png and samples_train.png (sampled), data_heldout.png (the procedural
videos of the same prompts, for comparison), attention_maps.png, head_stats.md and
head_stats.json (statistics over the held-out samples; see head_stats.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .data import HELD_OUT, TRAIN_PROMPTS, Prompt, render_videos
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
assert set(TRAIN_SAMPLE_PROMPTS) <= set(TRAIN_PROMPTS)


def write_report(model, out: Path, seed: int = 0, steps: int = SAMPLE_STEPS) -> dict:
    """Sample, measure and write the report files into `out`; returns the statistics summary."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    recorder = HeadStatistics(cfg.num_layers, cfg.num_attention_heads)
    held = [p.text for p in HELD_OUT]
    videos = generate(model, held, [seed] * len(held), steps=steps, controller=recorder)
    save_strip(out / "samples_heldout.png", videos, held)
    save_strip(out / "data_heldout.png", render_videos(held, torch.Generator().manual_seed(seed)), held)
    train = [p.text for p in TRAIN_SAMPLE_PROMPTS]
    save_strip(out / "samples_train.png", generate(model, train, [seed] * len(train), steps=steps), train)
    table = recorder.table()
    maps_image(recorder.maps()).save(out / "attention_maps.png")
    (out / "head_stats.md").write_text(stats_markdown(table))
    spread = {name: [round(float(table[..., i].min()), 3), round(float(table[..., i].max()), 3)] for i, name in enumerate(STATS)}
    summary = {"stats": list(STATS), "table": table.tolist(), "min_max_over_heads": spread}
    (out / "head_stats.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=SAMPLE_STEPS)
    args = parser.parse_args(argv)
    summary = write_report(load_testbed(args.weights, args.device), args.out, steps=args.steps)
    print(json.dumps(summary["min_max_over_heads"]))


if __name__ == "__main__":
    main()
