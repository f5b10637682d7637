"""bench/e2e.py runs end to end on the CPU with --tiny, and its all-dense row matches unpatched."""

import pytest

from sparse_vdit.bench import e2e


def test_e2e_tiny_runs_every_row_and_the_all_dense_strategy_is_exact(tmp_path):
    out = tmp_path / "e2e.md"
    table = e2e.main(["--tiny", "--models", "wan13b", "--out", str(out)])
    assert out.read_text().strip() == table.strip()
    rows = [line for line in table.splitlines() if line.startswith("| Wan2.1-1.3B")]
    assert [r.split(" | ")[1] for r in rows] == ["unpatched (SDPA)", "all-dense strategy (engine)",
                                                 "paper-like 0.25", "paper-like 0.45"]
    assert "max |diff| to unpatched 0 |" in rows[1]
    densities = [float(r.split(" | ")[2]) for r in rows[2:]]
    assert densities[0] == pytest.approx(0.25, abs=0.05) and densities[1] == pytest.approx(0.45, abs=0.05)


def test_e2e_rejects_unknown_models():
    with pytest.raises(SystemExit):
        e2e.main(["--tiny", "--models", "sd15"])
