"""Smoke test of the heatmap encoding benchmark: a complete table, and both encodings the same picture."""

from __future__ import annotations

from tests.bench.conftest import run_table


def test_render_benchmark_prints_a_row_per_size(bench_render, capsys):
    rows = run_table(bench_render, ["--sizes", "14x14", "96x64", "--repeats", "1"], capsys)
    assert [row[0] for row in rows] == ["14x14", "96x64"]
    for row in rows:
        assert row[6] == "yes"
        assert int(row[4]) > 0 and int(row[5]) > 0
    # beyond a few hundred pixels the palette PNG is the smaller file (its palette costs 768 bytes)
    assert int(rows[1][5]) < int(rows[1][4])
