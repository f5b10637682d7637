"""Shared ending of the benchmarks: print the markdown table last and keep a copy."""

from __future__ import annotations


def emit(table: str, out: str | None) -> str:
    """Print `table` and, when `out` is a path, write it there too; returns the table."""
    print(table)
    if out:
        with open(out, "w") as f:
            f.write(table if table.endswith("\n") else table + "\n")
    return table
