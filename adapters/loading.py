"""Offline loading of transformers and VAEs from the user's files, with configs shipped in configs/."""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class LoadError(ValueError):
    """A file or folder that cannot be loaded as what was expected; the message says what was."""


def shipped_config(variant: str) -> dict:
    """The config dict shipped as configs/<variant>/config.json."""
    path = CONFIG_DIR / variant / "config.json"
    if not path.is_file():
        known = sorted(p.name for p in CONFIG_DIR.iterdir() if (p / "config.json").is_file())
        raise LoadError(f"no shipped config for variant {variant!r}; known variants: {', '.join(known)}")
    return json.loads(path.read_text())
