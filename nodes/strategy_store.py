"""Strategy files in ComfyUI's ``models/sparse_strategies`` folder (through ``folder_paths``).

Loaded strategies are cached by (path, mtime, size), so an edited file is re-read and an
unchanged one is not.
"""

from __future__ import annotations

import os
import re
from typing import Any

from ..strategies.file import StrategyError, load_strategy, save_strategy

FOLDER = "sparse_strategies"
EXTENSIONS = {".safetensors"}

_cache: dict[tuple[str, int, int], Any] = {}


def _folder_paths():
    import folder_paths

    return folder_paths


def register_folder() -> None:
    """Make ``models/sparse_strategies`` a ComfyUI model folder listing .safetensors files.

    A folder a user already named in extra_model_paths.yaml (loaded before custom nodes) is kept;
    ours is appended and the extension set fixed (add_model_folder_path alone lists every file).
    """
    fp = _folder_paths()
    default = os.path.join(fp.models_dir, FOLDER)
    entry = fp.folder_names_and_paths.get(FOLDER)
    if entry is None:
        fp.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))
        return
    paths = list(entry[0])
    if default not in paths:
        paths.append(default)
    fp.folder_names_and_paths[FOLDER] = (paths, set(entry[1]) | EXTENSIONS)


def strategy_names() -> list[str]:
    """File names (relative to the folder) a Load Strategy node offers."""
    return list(_folder_paths().get_filename_list(FOLDER))


def strategy_path(name: str) -> str:
    """Full path of a listed strategy file; StrategyError (not_found) when there is none."""
    path = _folder_paths().get_full_path(FOLDER, name)
    if path is None or not os.path.isfile(path):
        raise StrategyError(StrategyError.NOT_FOUND,
                            f"strategy file '{name}' not found in models/{FOLDER}")
    return path


def fingerprint(name: str) -> str:
    """Changes whenever the file does (mtime and size), so ComfyUI re-runs the loader."""
    try:
        stat = os.stat(strategy_path(name))
    except (StrategyError, OSError) as err:
        return f"missing: {err}"
    return f"{stat.st_mtime_ns}:{stat.st_size}"


def load(name: str) -> Any:
    """The Strategy in a listed file (cached until the file changes); StrategyError if unusable."""
    path = strategy_path(name)
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _cache:
        for old in [k for k in _cache if k[0] == path]:
            del _cache[old]
        _cache[key] = load_strategy(path)
    return _cache[key]


def safe_stem(prefix: str) -> str:
    stem = prefix.strip().replace("\\", "/").strip("/")
    if stem.endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    parts = [p for p in stem.split("/") if p]
    if not parts or any(p in (".", "..") or not re.fullmatch(r"[\w.\- ]+", p) for p in parts):
        raise ValueError(f"bad file name '{prefix}': use letters, digits, '-', '_', '.' and '/' "
                         "for sub-folders of models/sparse_strategies")
    return os.path.join(*parts)


def search_state_path(filename_prefix: str) -> str:
    """Where a search named ``filename_prefix`` keeps its resumable state (not listed as a strategy)."""
    root = _folder_paths().get_folder_paths(FOLDER)[0]
    os.makedirs(root, exist_ok=True)
    return os.path.join(root, safe_stem(filename_prefix).replace(os.sep, "_") + ".search-state")


def save(strategy: Any, filename_prefix: str) -> str:
    """Write ``strategy`` as a new file ``<prefix>_00001.safetensors`` in the first strategy
    folder; returns the name relative to that folder."""
    root = _folder_paths().get_folder_paths(FOLDER)[0]
    stem = safe_stem(filename_prefix)
    os.makedirs(os.path.dirname(os.path.join(root, stem)) or root, exist_ok=True)
    counter = 1
    while os.path.exists(os.path.join(root, f"{stem}_{counter:05d}.safetensors")):
        counter += 1
    name = f"{stem}_{counter:05d}.safetensors"
    save_strategy(strategy, os.path.join(root, name))
    return name.replace(os.sep, "/")
