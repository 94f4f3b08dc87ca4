"""Smoke test of the map encoding benchmark: complete tables, and both encodings the same content."""

from __future__ import annotations

from tests.bench.conftest import run_tables


def test_render_benchmark_prints_a_row_per_size(bench_render, capsys):
    heatmaps, numbers = run_tables(
        bench_render, ["--sizes", "14x14", "96x64", "--repeats", "1"], capsys, count=2
    )
    assert [row[0] for row in heatmaps] == ["14x14", "96x64"]
    for row in heatmaps:
        assert row[11] == "yes"  # every PNG, whichever deflate wrote it, decodes to the same pixels
        assert all(int(row[column]) > 0 for column in (7, 8, 9, 10))
    # beyond a few hundred pixels the palette PNG is the smaller file (its palette costs 768 bytes),
    # and the Sub-filtered rows of the service's writer deflate smaller than Pillow's unfiltered ones
    assert int(heatmaps[1][8]) < int(heatmaps[1][7])
    assert int(heatmaps[1][8]) < int(heatmaps[1][10]) and int(heatmaps[1][9]) < int(heatmaps[1][10])
    assert [row[0] for row in numbers] == ["14x14", "96x64"]
    for row in numbers:
        assert row[5] == "yes" and int(row[4]) > 0
