"""Strategy files: ``.safetensors`` with the tables as tensors and the rest as JSON metadata.

Layout of a file (never pickle):

- tensor ``choice``   int16  [buckets, layers, heads]: index into the candidate list
- tensor ``sigma_edges`` float64 [buckets + 1], descending
- tensor ``errors``   float32 [buckets, layers, heads, candidates] (optional: searched files only)
- tensor ``cost``     float32 [candidates] (optional): predicted time of one head of one layer
- tensor ``step_weights`` float32 [buckets] (optional)
- header metadata key ``sparse_vdit``: JSON with ``format_version``, ``candidates`` (pattern
  dicts), ``model`` (family, variant, fingerprint), ``geometry``, ``schedule``, ``search``,
  ``gpu``, ``package_version``, ``dense_above_sigma``, ``dense_layers``.

Every failure to read one raises a :class:`StrategyError` (a ``ValueError``) whose ``code`` says
what went wrong and whose message says it in words a user understands.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Mapping

import torch

from .geometry import VideoGeometry
from .patterns import pattern_from_dict
from .strategy import Strategy

FORMAT_VERSION = 1
METADATA_KEY = "sparse_vdit"
HEADER_CAP = 64 * 1024 * 1024  # a strategy header is a few hundred KB at most
MAX_CANDIDATES = 4096


class StrategyError(ValueError):
    """A strategy file could not be used. ``code`` is one of the ``StrategyError.*`` names."""

    NOT_FOUND = "not_found"
    NOT_SAFETENSORS = "not_safetensors"
    CORRUPT = "corrupt"
    NOT_A_STRATEGY = "not_a_strategy"
    NEWER_VERSION = "newer_version"
    WRONG_MODEL = "wrong_model"
    BAD_VALUES = "bad_values"

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SearchRecord:
    """What a search measured, kept with its strategy so it can be re-selected without a search.

    ``errors[b, l, h, c]``: relative error of candidate ``c`` at (bucket, layer, head), averaged
    over the bucket's forwards; ``cost[c]``: predicted time of one head of one layer with candidate
    ``c``; ``step_weights[b]``: how much the errors of bucket ``b`` count in the final sample;
    ``bucket_steps[b]``: forwards per bucket in the searched schedule; ``dense_layer``: time of one
    all-dense layer (the model's SDPA) in the unit of ``cost``.
    """

    candidates: tuple
    errors: torch.Tensor
    cost: torch.Tensor
    step_weights: torch.Tensor
    bucket_steps: torch.Tensor
    dense_layer: float

    def __post_init__(self):
        b, l, h, c = _shape4(self.errors)
        if len(self.candidates) != c or tuple(self.cost.shape) != (c,):
            raise ValueError(
                f"search record: {len(self.candidates)} candidates, errors have {c}, "
                f"cost has shape {tuple(self.cost.shape)}"
            )
        for name in ("step_weights", "bucket_steps"):
            if tuple(getattr(self, name).shape) != (b,):
                raise ValueError(f"search record: {name} shape {tuple(getattr(self, name).shape)} != ({b},)")


def _shape4(t: torch.Tensor) -> tuple[int, int, int, int]:
    if t.dim() != 4:
        raise ValueError(f"errors table must be 4-D [buckets, layers, heads, candidates], got {tuple(t.shape)}")
    return tuple(t.shape)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- fingerprint


def model_fingerprint(model: torch.nn.Module | None, *, layers: int, heads: int, head_dim: int,
                      family: str = "", variant: str = "") -> dict:
    """Architecture numbers plus a hash of a few weights, so a file is tied to one set of weights.

    The hash covers the first 4096 values (as float32) of the first, middle and last parameter,
    which tells apart two checkpoints of the same architecture (e.g. the two Wan2.2 experts).
    """
    digest = ""
    if model is not None:
        params = [p for p in model.parameters() if p.numel() > 0]
        if params:
            h = hashlib.sha256()
            for p in (params[0], params[len(params) // 2], params[-1]):
                sample = p.detach().reshape(-1)[:4096].to("cpu", torch.float32).contiguous()
                h.update(sample.numpy().tobytes())
            digest = h.hexdigest()[:16]
    return {"family": family, "variant": variant, "layers": int(layers), "heads": int(heads),
            "head_dim": int(head_dim), "weights_hash": digest}


def _fingerprint_mismatch(stored: Mapping, expected: Mapping) -> str | None:
    for key in ("layers", "heads", "head_dim"):
        if key in expected and key in stored and int(stored[key]) != int(expected[key]):
            return f"{key} {stored[key]} (file) vs {expected[key]} (model)"
    for key in ("family", "variant", "weights_hash"):
        a, b = stored.get(key) or "", expected.get(key) or ""
        if a and b and a != b:
            return f"{key} '{a}' (file) vs '{b}' (model)"
    return None


# ----------------------------------------------------------------------------- save


def save_strategy(strategy: Strategy, path: str | os.PathLike, *, record: SearchRecord | None = None,
                  fingerprint: Mapping | None = None, geometry: VideoGeometry | None = None,
                  schedule: Mapping | None = None, search: Mapping | None = None,
                  gpu: str | None = None) -> None:
    """Write ``strategy`` to ``path`` (.safetensors). Missing arguments come from ``strategy.meta``.

    ``record`` (or ``strategy.meta["record"]``) adds the full error and cost tables, which is what
    :func:`sparse_vdit.strategies.select.reselect` needs.
    """
    from safetensors.torch import save_file

    meta = dict(strategy.meta)
    record = record if record is not None else meta.get("record")
    candidates = list(record.candidates) if record is not None else []
    index = {p: i for i, p in enumerate(candidates)}
    choice = torch.empty(len(strategy.patterns), strategy.layers, strategy.heads, dtype=torch.int16)
    for b, bucket in enumerate(strategy.patterns):
        for l, layer in enumerate(bucket):
            for h, pattern in enumerate(layer):
                if pattern not in index:
                    index[pattern] = len(candidates)
                    candidates.append(pattern)
                choice[b, l, h] = index[pattern]
    if len(candidates) > MAX_CANDIDATES:
        raise ValueError(f"{len(candidates)} distinct patterns; a strategy file holds at most {MAX_CANDIDATES}")
    tensors = {"choice": choice,
               "sigma_edges": torch.tensor(strategy.sigma_edges, dtype=torch.float64)}
    if record is not None:
        pad = len(candidates) - len(record.candidates)  # patterns outside the searched set: unmeasured
        errors = record.errors.to(torch.float32)
        cost = record.cost.to(torch.float32)
        if pad:
            errors = torch.cat([errors, errors.new_full((*errors.shape[:3], pad), float("nan"))], -1)
            cost = torch.cat([cost, cost.new_full((pad,), float("nan"))])
        tensors.update(errors=errors.contiguous(), cost=cost.contiguous(),
                       step_weights=record.step_weights.to(torch.float32).contiguous(),
                       bucket_steps=record.bucket_steps.to(torch.float32).contiguous(),
                       dense_layer=torch.tensor([record.dense_layer], dtype=torch.float64))
    geometry = geometry if geometry is not None else meta.get("geometry")
    if isinstance(geometry, VideoGeometry):
        geometry = {k: getattr(geometry, k) for k in ("frames", "height", "width", "prefix", "suffix")}
    header = {
        "format_version": FORMAT_VERSION,
        "candidates": [p.to_dict() for p in candidates],
        "model": dict(fingerprint if fingerprint is not None else meta.get("model", {})),
        "geometry": geometry,
        "schedule": dict(schedule if schedule is not None else meta.get("schedule", {})),
        "search": dict(search if search is not None else meta.get("search", {})),
        "gpu": gpu if gpu is not None else meta.get("gpu", ""),
        "package_version": _package_version(),
        "dense_above_sigma": strategy.dense_above_sigma,
        "dense_layers": sorted(int(i) for i in strategy.dense_layers),
    }
    save_file(tensors, os.fspath(path), metadata={METADATA_KEY: json.dumps(header)})


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("comfyui-sparse-vdit")
    except Exception:  # not installed as a distribution (ComfyUI folder copy)
        return "unknown"


# ----------------------------------------------------------------------------- load


def read_header(path: str | os.PathLike) -> dict:
    """The JSON metadata of a strategy file, after checking the safetensors framing.

    Checks the 8-byte header length against the file size and :data:`HEADER_CAP` before parsing.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise StrategyError(StrategyError.NOT_FOUND, f"strategy file not found: {path}")
    size = os.path.getsize(path)
    name = os.path.basename(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise StrategyError(StrategyError.NOT_SAFETENSORS,
                                f"{name} is not a strategy file: only {size} bytes, too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > HEADER_CAP:
            raise StrategyError(StrategyError.NOT_SAFETENSORS,
                                f"{name} is not a strategy file: its header claims {n} bytes, above the "
                                f"{HEADER_CAP} byte limit (random bytes or a damaged file)")
        if n + 8 > size:
            raise StrategyError(StrategyError.CORRUPT,
                                f"{name} is truncated or corrupt: its header claims {n} bytes but the file "
                                f"has only {size - 8} after the length field")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StrategyError(StrategyError.NOT_SAFETENSORS,
                            f"{name} is not a strategy file: its header is not safetensors JSON") from None
    if not isinstance(header, dict):
        raise StrategyError(StrategyError.NOT_SAFETENSORS, f"{name} is not a strategy file: bad safetensors header")
    end = 8 + n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise StrategyError(StrategyError.CORRUPT, f"{name} is corrupt: tensor '{key}' has no valid offsets")
        end = max(end, 8 + n + int(offsets[1]))
    if end > size:
        raise StrategyError(StrategyError.CORRUPT,
                            f"{name} is truncated: its tensors need {end} bytes, the file has {size}")
    meta = header.get("__metadata__") or {}
    if METADATA_KEY not in meta:
        raise StrategyError(StrategyError.NOT_A_STRATEGY,
                            f"{name} is a safetensors file but not a Sparse-vDiT strategy "
                            f"(no '{METADATA_KEY}' metadata; is it model weights?)")
    try:
        doc = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError:
        raise StrategyError(StrategyError.CORRUPT, f"{name} is corrupt: its strategy metadata is not valid JSON") from None
    if not isinstance(doc, dict):
        raise StrategyError(StrategyError.CORRUPT, f"{name} is corrupt: its strategy metadata is not an object")
    version = doc.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise StrategyError(StrategyError.CORRUPT, f"{name} is corrupt: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise StrategyError(StrategyError.NEWER_VERSION,
                            f"{name} was written by a newer Sparse-vDiT (format {version}; this version reads "
                            f"up to {FORMAT_VERSION}); update the extension")
    return doc


def load_strategy(path: str | os.PathLike, expect_fingerprint: Mapping | None = None) -> Strategy:
    """Read and validate a strategy file; ``expect_fingerprint`` (see :func:`model_fingerprint`)
    refuses a file searched on another model. The search record, if any, is ``meta["record"]``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    doc = read_header(path)
    name = os.path.basename(os.fspath(path))
    try:
        tensors = load_file(os.fspath(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise StrategyError(StrategyError.CORRUPT, f"{name} is corrupt: {exc}") from None

    def bad(msg: str) -> StrategyError:
        return StrategyError(StrategyError.BAD_VALUES, f"{name} has unusable values: {msg}")

    for key in ("choice", "sigma_edges"):
        if key not in tensors:
            raise StrategyError(StrategyError.CORRUPT, f"{name} is corrupt: tensor '{key}' is missing")
    choice, edges = tensors["choice"], tensors["sigma_edges"]
    if choice.dim() != 3 or choice.dtype != torch.int16 or min(choice.shape) < 1:
        raise bad(f"choice table has shape {tuple(choice.shape)} / {choice.dtype}, expected int16 [buckets, layers, heads]")
    buckets, layers, heads = choice.shape
    if tuple(edges.shape) != (buckets + 1,) or not torch.isfinite(edges).all():
        raise bad(f"sigma_edges must be {buckets + 1} finite numbers, got shape {tuple(edges.shape)}")
    if not bool((edges[:-1] > edges[1:]).all()) or float(edges[-1]) < 0:
        raise bad("sigma_edges must be descending and non-negative")

    raw_candidates = doc.get("candidates")
    if not isinstance(raw_candidates, list) or not raw_candidates or len(raw_candidates) > MAX_CANDIDATES:
        raise bad("the candidate pattern list is missing or empty")
    try:
        candidates = tuple(pattern_from_dict(d) for d in raw_candidates)
    except (ValueError, TypeError, KeyError) as exc:
        raise bad(f"a candidate pattern is invalid ({exc})") from None
    if int(choice.min()) < 0 or int(choice.max()) >= len(candidates):
        raise bad(f"pattern index out of range 0..{len(candidates) - 1}")

    model = doc.get("model") or {}
    if not isinstance(model, dict):
        raise bad("model fingerprint is not an object")
    for key, want in (("layers", layers), ("heads", heads)):
        if key in model and int(model[key]) != want:
            raise bad(f"fingerprint says {key}={model[key]} but the tables have {want}")
    if expect_fingerprint is not None:
        why = _fingerprint_mismatch(model, expect_fingerprint)
        if why:
            raise StrategyError(StrategyError.WRONG_MODEL,
                                f"{name} was searched for a different model: {why}")

    dense_above = doc.get("dense_above_sigma")
    if dense_above is not None and (not isinstance(dense_above, (int, float)) or not math.isfinite(dense_above)
                                    or dense_above < 0):
        raise bad(f"dense_above_sigma {dense_above!r} is not a non-negative number")
    dense_layers = doc.get("dense_layers") or []
    if not isinstance(dense_layers, list) or any(not isinstance(i, int) or not 0 <= i < layers for i in dense_layers):
        raise bad(f"dense_layers must be layer indices in 0..{layers - 1}")

    record = None
    if "errors" in tensors:
        errors, cost = tensors["errors"], tensors.get("cost")
        weights, steps = tensors.get("step_weights"), tensors.get("bucket_steps")
        dense_layer = tensors.get("dense_layer")
        if tuple(errors.shape) != (buckets, layers, heads, len(candidates)) or any(
                t is None for t in (cost, weights, steps, dense_layer)):
            raise bad(f"error table shape {tuple(errors.shape)} does not match "
                      f"[{buckets}, {layers}, {heads}, {len(candidates)}] or a cost/weight table is missing")
        if tuple(cost.shape) != (len(candidates),) or tuple(weights.shape) != (buckets,) \
                or tuple(steps.shape) != (buckets,) or dense_layer.numel() != 1:
            raise bad("cost, step_weights, bucket_steps or dense_layer table has the wrong length")
        measured = errors[~torch.isnan(errors)]
        tables = torch.cat([cost[~torch.isnan(cost)].double(), weights.double(), steps.double(),
                            dense_layer.double().reshape(1)])
        if (measured < 0).any() or torch.isinf(measured).any() or not torch.isfinite(tables).all() \
                or (tables < 0).any() or float(dense_layer) <= 0:
            raise bad("negative or infinite errors, costs, step weights or dense layer time")
        record = SearchRecord(candidates, errors, cost, weights, steps, float(dense_layer))

    table = choice.long()
    patterns = tuple(tuple(tuple(candidates[int(c)] for c in table[b, l]) for l in range(layers))
                     for b in range(buckets))
    meta = {k: doc.get(k) for k in ("model", "geometry", "schedule", "search", "gpu", "package_version")}
    meta["format_version"] = doc["format_version"]
    meta["record"] = record
    try:
        return Strategy(layers=layers, heads=heads, sigma_edges=tuple(float(e) for e in edges),
                        patterns=patterns,
                        dense_above_sigma=None if dense_above is None else float(dense_above),
                        dense_layers=frozenset(dense_layers), meta=meta)
    except ValueError as exc:
        raise bad(str(exc)) from None


# ----------------------------------------------------------------------------- geometry, summary


def searched_geometry(strategy: Strategy) -> VideoGeometry | None:
    """The geometry a strategy was searched at, when its metadata records one."""
    g = (strategy.meta or {}).get("geometry")
    if isinstance(g, VideoGeometry):
        return g
    if not isinstance(g, Mapping):
        return None
    return VideoGeometry(**{k: int(g[k]) for k in ("frames", "height", "width", "prefix", "suffix") if k in g})


_warned_far: set = set()


def warn_if_far(strategy: Strategy, geom: VideoGeometry, factor: float = 2.0) -> bool:
    """Warn once per (searched, target) pair when ``geom`` is more than ``factor`` times larger or
    smaller than the searched geometry along some axis. Patterns still recompile (they are
    geometric); the choice of patterns may just fit less well. Returns whether it warned."""
    base = searched_geometry(strategy)
    if base is None:
        return False
    far = [axis for axis in ("frames", "height", "width")
           if max(getattr(geom, axis), 1) / max(getattr(base, axis), 1) > factor
           or max(getattr(base, axis), 1) / max(getattr(geom, axis), 1) > factor]
    key = (base, geom)
    if not far or key in _warned_far:
        return False
    _warned_far.add(key)
    warnings.warn(f"strategy searched at {base.frames}x{base.height}x{base.width} is used at "
                  f"{geom.frames}x{geom.height}x{geom.width} ({', '.join(far)} differ by more than "
                  f"{factor}x); patterns recompile, quality may differ from the searched one", stacklevel=2)
    return True


def strategy_summary(strategy: Strategy, geom: VideoGeometry, sigmas=None) -> dict:
    """Per layer: mode counts and mean token density over buckets (dense warm-up counted); overall
    density over ``sigmas`` (a schedule) or over buckets equally. JSON-safe, for ``info`` and UIs."""
    dens_cache: dict = {}

    def density(p) -> float:
        if p not in dens_cache:
            dens_cache[p] = float(p.density(geom))
        return dens_cache[p]

    warm = strategy.dense_above_sigma
    layers = []
    for l in range(strategy.layers):
        modes: dict[str, int] = {}
        vals = []
        for b, bucket in enumerate(strategy.patterns):
            dense_bucket = (l in strategy.dense_layers
                            or (warm is not None and strategy.sigma_edges[b + 1] >= warm))
            for p in bucket[l]:
                mode = "dense" if dense_bucket else p.name
                modes[mode] = modes.get(mode, 0) + 1
                vals.append(1.0 if dense_bucket else density(p))
        layers.append({"layer": l, "modes": modes, "density": sum(vals) / len(vals)})
    if sigmas is not None:
        overall = float(strategy.density(geom, sigmas))
    else:
        overall = sum(x["density"] for x in layers) / len(layers)
    return {"layers": layers, "density": overall, "buckets": len(strategy.patterns),
            "heads": strategy.heads, "dense_above_sigma": warm,
            "dense_layers": sorted(strategy.dense_layers)}
