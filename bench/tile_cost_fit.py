"""Where a sparse layer's time goes: what a masked tile and a program cost, in full tiles.

    python3 -m sparse_vdit.bench.tile_cost_fit RESULTS [--shape cogvideox] [--tag "[triton]"]
    python3 -m sparse_vdit.bench.tile_cost_fit --probe [--shape cogvideox] [--gluon 0,r128] [--out FILE]

--probe (GPU) times synthetic layers at a real shape: every program (q-tile of a head) visits the
first n k-tiles, all marked full or all marked masked (the same tiles and keys, the mask computed
and passing every pair), for n from 8 to every k-tile; under each kernel of --gluon (values of
SPARSE_VDIT_GLUON). The full rows' slope and intercept give a full tile's and a program's cost, the
masked rows' slope a masked tile's: measured apart, where the fit below can only share them out.

Without --probe, RESULTS is an attention_log.txt (JSON lines) or a markdown file holding
bench/attention.py tables; the rows used are our dense row and the sparse rows of one kernel (no
bracket: the default; --tag: the rows of "... [tag]", whose tile counts come from the unbracketed row
of the same layer) whose heads all run in frame-major order (space-major and cube-order heads also
copy K/V, which the model leaves out). Every program (one q-tile of one head) is modelled as

    t = a x full tiles + b x masked tiles + e        (summed over the layer's programs)

so b / a is what a masked tile costs in full tiles and e / (a x programs) the fixed cost of one
program (Q load, pipeline fill and drain, epilogue) in full tiles. The table splits each row's time
beyond its ideal (token density x our dense time) into: tiles visited beyond the attended pairs,
masked tiles' extra cost, and the programs' fixed cost. The dense row's counts come from the plan
compiled on the CPU. Needs three rows or more; reports the residuals of the fit.
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import torch

from ..kernels import rule as R
from ..kernels import sparse_attention
from ..kernels.tables import KernelTables, q_tile_bounds
from ..strategies.patterns import Dense
from ..strategies.plan import compile_layer
from .attention import SHAPES, env_set, tile_summary, time_ms

_COUNTS = re.compile(r"(\d+) full, (\d+) partial")
_FRAME_MAJOR = re.compile(r"; fm x\d+; \d+ full, \d+ partial")  # every head frame-major (tile_summary's note)


def read_rows(path: str) -> list[dict]:
    """(shape, variant, ms, token_density, note) of every row of a JSON-lines log or markdown tables."""
    rows = []
    with open(path) as fh:
        for line in fh:
            if line.startswith("{"):
                r = json.loads(line)
                if r.get("variant") and r.get("ms"):
                    rows.append({k: r[k] for k in ("shape", "variant", "ms", "token_density", "note")})
            elif line.startswith("| ") and line.count("|") >= 13:
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                try:
                    rows.append(dict(shape=cells[0], variant=cells[1], ms=float(cells[4]),
                                     token_density=float(cells[2]), note=cells[11]))
                except ValueError:  # a header, a skipped row
                    continue
    return rows


def layer_counts(shape: str) -> tuple[int, int, int]:
    """(programs, full, masked tiles) of the dense layer at a shape (128 x 64 tiles)."""
    _, geom, heads, _ = SHAPES[shape]
    plan = compile_layer((Dense(),) * heads, geom, 128, 64, "cpu")
    full, masked = map(int, _COUNTS.search(tile_summary(plan.tables)).groups())
    return plan.tables.num_q_tiles * heads, full, masked


def fit(rows: list[dict], shape: str, tag: str = "") -> dict:
    """The fit (a, b, e in ms; masked tile and program cost in full tiles) and each row's split."""
    label = SHAPES[shape][0]
    mine = [r for r in rows if r["shape"] == label]
    counts = {r["variant"]: _COUNTS.search(r["note"]) for r in mine if _FRAME_MAJOR.search(r["note"])}
    programs, dense_full, dense_masked = layer_counts(shape)
    suffix = f" {tag}" if tag else ""
    used = []
    for r in mine:
        name = r["variant"][:-len(suffix)] if suffix and r["variant"].endswith(suffix) else None
        if not suffix and "[" not in r["variant"]:
            name = r["variant"]
        if name is None:
            continue
        if name.startswith("ours dense"):
            used.append((r["variant"], dense_full, dense_masked, r))
        elif counts.get(name):
            full, masked = map(int, counts[name].groups())
            used.append((r["variant"], full, masked, r))
    dense = [u for u in used if u[0].startswith("ours dense")]
    if len(used) < 3 or not dense:
        raise ValueError(f"{label}{suffix}: need our dense row and two sparse rows or more, got {len(used)}")
    A = np.array([[full, masked, 1.0] for _, full, masked, _ in used])
    t = np.array([u[3]["ms"] for u in used])
    (a, b, e), *_ = np.linalg.lstsq(A, t, rcond=None)
    t_dense = dense[0][3]["ms"]
    split = []
    for (variant, full, masked, r), got in zip(used, A @ np.array([a, b, e])):
        ideal = r["token_density"] * t_dense
        split.append(dict(variant=variant, ms=r["ms"], fitted=got, ideal=ideal,
                          tiles=a * (full + masked) + e * r["token_density"] - ideal,
                          masked=(b - a) * masked, programs=e * (1 - r["token_density"]),
                          efficiency=ideal / r["ms"]))
    return dict(shape=label, tag=tag, programs=programs, a=a, b=b, e=e, masked_tile=b / a,
                program_tiles=e / a / programs, rows=split)


def report(result: dict) -> str:
    """The fit as markdown."""
    lines = [f"{result['shape']} {result['tag'] or '(default kernel)'}: a masked tile costs "
             f"{result['masked_tile']:.2f} full tiles, a program {result['program_tiles']:.1f} full tiles "
             f"({result['programs']} programs, fixed cost {result['e']:.2f} ms a layer)", "",
             "| row | ms | fitted | ideal | tiles beyond pairs | masked extra | programs' fixed cost | efficiency |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['ms']:.2f} | {r['fitted']:.2f} | {r['ideal']:.2f} | {r['tiles']:.2f} | "
                     f"{r['masked']:.2f} | {r['programs']:.2f} | {r['efficiency']:.2f} |")
    return "\n".join(lines)


def probe_tables(geom, heads: int, n_tiles: int, full: bool, block_m: int = 128, block_n: int = 64,
                 device="cuda") -> KernelTables:
    """Tables where every head's every q-tile visits k-tiles [0, n_tiles), all `full` or all masked,
    under a rule that attends every pair (so the masked path computes its mask and passes it all)."""
    nq = len(q_tile_bounds(geom.prefix, geom.grid_tokens, geom.seq_len, block_m)) - 1
    rule = R.make_rule(diag=geom.seq_len)
    return KernelTables(torch.tensor([rule] * heads, dtype=torch.int32, device=device),
                        torch.arange(nq + 1, dtype=torch.int32, device=device),
                        torch.tensor([[0, n_tiles, int(full)]] * nq, dtype=torch.int32, device=device),
                        geom.prefix, geom.frames, geom.height, geom.width, geom.seq_len, block_m, block_n)


def probe(shape: str, modes: list[str], device="cuda", dtype=torch.bfloat16, timer=time_ms) -> list[dict]:
    """Per kernel mode (SPARSE_VDIT_GLUON value), `timer`'s ms of the synthetic layers (`probe_tables`,
    128 x 64 tiles) and the costs fitted from them."""
    label, geom, heads, head_dim = SHAPES[shape]
    L = geom.seq_len
    n_k = -(-L // 64)
    sizes = sorted({min(n, n_k - 1) for n in (8, 16, 32, 64, 128, 256)} | {n_k - 1})  # the last k-tile is cut
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, L, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(3))
    results = []
    for mode in modes:
        with env_set("SPARSE_VDIT_GLUON", mode):
            ms = {(n, full): timer(lambda: sparse_attention(q, k, v, tables))
                  for n in sizes for full in (True, False)
                  for tables in [probe_tables(geom, heads, n, full, device=device)]}
        programs = heads * (len(q_tile_bounds(geom.prefix, geom.grid_tokens, L, 128)) - 1)
        a, e = np.polyfit(sizes, [ms[n, True] for n in sizes], 1)
        b, _ = np.polyfit(sizes, [ms[n, False] for n in sizes], 1)
        results.append(dict(shape=label, mode=mode, sizes=sizes, ms=ms, masked_tile=b / a,
                            program_tiles=e / a, programs=programs))
    return results


def probe_report(results: list[dict]) -> str:
    """The probe as markdown: ms per k-tiles a program, full and masked, and the fitted costs."""
    lines = []
    for r in results:
        lines += [f"{r['shape']}, SPARSE_VDIT_GLUON={r['mode']}: a masked tile costs {r['masked_tile']:.2f} full "
                  f"tiles, a program {r['program_tiles']:.1f} full tiles ({r['programs']} programs)", "",
                  "| k-tiles a program | " + " | ".join(map(str, r["sizes"])) + " |",
                  "|---|" + "---|" * len(r["sizes"])]
        for full in (True, False):
            lines.append(f"| {'full' if full else 'masked'} (ms) | "
                         + " | ".join(f"{r['ms'][n, full]:.2f}" for n in r["sizes"]) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="?")
    ap.add_argument("--shape", default="cogvideox", choices=sorted(SHAPES))
    ap.add_argument("--tag", default="", help='the bracketed rows to fit, e.g. "[triton]" (default: unbracketed)')
    ap.add_argument("--probe", action="store_true", help="time synthetic layers on the GPU instead")
    ap.add_argument("--gluon", default="0,auto", help="SPARSE_VDIT_GLUON values the probe runs under")
    ap.add_argument("--out", help="also write the report here")
    args = ap.parse_args(argv)
    if args.probe == (args.results is not None):
        ap.error("give RESULTS or --probe")
    if args.probe and not torch.cuda.is_available():
        raise SystemExit("--probe needs a CUDA GPU")
    text = (probe_report(probe(args.shape, args.gluon.split(","))) if args.probe
            else report(fit(read_rows(args.results), args.shape, args.tag)))
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
