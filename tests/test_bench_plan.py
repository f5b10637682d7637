"""bench/plan.py: compile-time and table-memory rows on a small geometry."""

from sparse_vdit.bench.plan import plan_rows
from sparse_vdit.strategies.geometry import VideoGeometry
from sparse_vdit.strategies.plan import pool_bytes
from sparse_vdit.strategies.search import candidate_set


def test_plan_rows_count_layers_distinct_patterns_and_memory():
    geometry = VideoGeometry(frames=4, height=6, width=10, prefix=5)
    rows = plan_rows(geometry, heads=6, layers=3, tiles=(16, 16), buckets=2)
    assert [r["layers"] for r in rows] == [1, 1, 1, 1, 6, 3]
    candidates = len(candidate_set(geometry, (0.05, 0.1, 0.2, 0.35)))
    assert rows[3]["distinct"] <= min(6, candidates) and rows[4]["distinct"] <= candidates
    assert all(r["ms"] > 0 and r["mb"] > 0 for r in rows)
    assert pool_bytes() == 0  # the benchmark leaves no plans behind


def test_pattern_rows_time_every_search_candidate_and_bad_threads_are_refused(capsys):
    import pytest

    from sparse_vdit.bench.plan import main, pattern_rows

    geometry = VideoGeometry(frames=3, height=5, width=7)
    rows = pattern_rows(geometry, tiles=(16, 16))
    assert [r["pattern"] for r in rows] == [str(p) for p in candidate_set(geometry, (0.05, 0.1, 0.2, 0.35))]
    assert all(r["ms"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        main(["--threads", "0"])
    assert "--threads must be >= 1" in capsys.readouterr().err
