"""The sparse-attention kernel's SASS per k-tile loop, compiled for a GPU on the CPU (no GPU needed).

    python3 -m sparse_vdit.bench.kernel_sass [--arch 90] [--head-dim 128] [--tiles 128x64]
                                             [--warps 8] [--stages 3] [--no-tma] [--merged-cube] [--paired]
                                             [--out FILE]

Triton builds the sm_`arch` binary with the divisibility hints of a real launch; `nvdisasm` (shipped
with Triton) disassembles it. Every backward branch closes a loop. A loop with tensor-core
instructions (HGMMA / HMMA) is a k-tile loop, and its length is the static instruction count one
warp issues per k-tile. Per loop the table gives TMA loads (UTMALDG), other global loads
(LDG / LDGSTS), score selects (FSEL: masked loops), spills (LDL / STL) and the most frequent
opcodes. Branches inside a loop (head kinds, token orders) all count here; a head runs only its
own. Registers and stack: `cuobjdump -res-usage`. Run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

from ..kernels.compile_target import compile_for_target
from .report import emit

_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?(\.L_x_\d+)")


def _nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def instruction_name(instruction: str) -> str:
    """An instruction's full name without its predicate, e.g. "WARPGROUP.DEPBAR.LE"."""
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0]


def _opcode(instruction: str) -> str:
    return instruction_name(instruction).split(".")[0]


def innermost_loops(sass: str, is_loop) -> list[list[str]]:
    """The instructions of every innermost loop (label ... backward branch to it) of a disassembly
    whose body `is_loop(body)` accepts, in order."""
    labels, instructions, pending = {}, [], []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = _INSTRUCTION.match(line)
        if match:
            labels.update((name, len(instructions)) for name in pending)
            pending = []
            instructions.append(match.group(1))
    spans = []
    for end, instruction in enumerate(instructions):
        branch = _BRANCH.search(instruction)
        start = labels.get(branch.group(1), end + 1) if branch else end + 1
        if start <= end and is_loop(instructions[start:end + 1]):
            spans.append((start, end))
    # innermost: no other accepted loop inside (outer loops repeat their bodies)
    return [instructions[a:b + 1] for a, b in spans
            if not any((a, b) != (c, d) and a <= c and d <= b for c, d in spans)]


def kernel_loops(sass: str) -> list[list[str]]:
    """The instructions of every innermost k-tile loop (holding tensor-core instructions) of a
    disassembly, in order. A span holding EXIT is no loop: an out-of-line block after the exit
    branching back into one."""
    return innermost_loops(sass, lambda body: any(_opcode(i) in ("HGMMA", "HMMA") for i in body)
                           and not any(_opcode(i) == "EXIT" for i in body))


def loop_table(body: list[str]) -> dict:
    """Counts of one loop's instructions by kind."""
    ops = collections.Counter(_opcode(i) for i in body)
    return {
        "instructions": len(body),
        "mma": ops["HGMMA"] + ops["HMMA"],
        "tma_loads": ops["UTMALDG"],
        "global_loads": ops["LDG"] + ops["LDGSTS"],
        "score_selects": ops["FSEL"],
        "spills": ops["LDL"] + ops["STL"],
        "top": ", ".join(f"{k} {v}" for k, v in ops.most_common(6)),
    }


def disassemble(kernel) -> tuple[str, int, int]:
    """(SASS text, registers per thread, stack bytes) of a Triton or Gluon CompiledKernel's cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([_nvidia_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
    resources = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return sass, int(resources.group(1)), int(resources.group(2))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tiles", default="128x64")
    parser.add_argument("--warps", type=int, default=8)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--maxnreg", type=int, help="cap the registers per thread (a config's maxnreg)")
    parser.add_argument("--no-tma", action="store_true", help="the gathered-load kernel (pre-Hopper path)")
    parser.add_argument("--merged-cube", action="store_true",
                        help="with the merged run walk of cube-order heads (an autotuned TMA variant)")
    parser.add_argument("--paired", action="store_true",
                        help="with full tiles two a step (an autotuned TMA variant)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    block_m, block_n = (int(x) for x in args.tiles.split("x"))
    tma = not args.no_tma and args.arch >= 90
    kernel = compile_for_target(args.arch, args.head_dim, block_m, block_n, tma, args.warps, args.stages,
                                merged_cube=args.merged_cube and tma, maxnreg=args.maxnreg,
                                paired=args.paired and tma)
    sass, registers, stack = disassemble(kernel)
    lines = [f"sm_{args.arch}, head_dim {args.head_dim}, tiles {args.tiles}, {args.warps} warps x "
             f"{args.stages} stages{f', maxnreg {args.maxnreg}' if args.maxnreg else ''}, "
             f"TMA {'on' if tma else 'off'}: {registers} registers, "
             f"{stack} B stack, {kernel.metadata.shared} B shared memory",
             "",
             "| k-tile loop | instructions | MMA | TMA loads | other global loads | score selects | spills | top opcodes |",
             "|---|---|---|---|---|---|---|---|"]
    for n, body in enumerate(kernel_loops(sass), 1):
        row = loop_table(body)
        lines.append(f"| {n} | {row['instructions']} | {row['mma']} | {row['tma_loads']} | {row['global_loads']} | "
                     f"{row['score_selects']} | {row['spills']} | {row['top']} |")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
