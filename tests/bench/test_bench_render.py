"""Smoke test of the heatmap encoding benchmark: a complete table, and both encodings the same picture."""

from __future__ import annotations

import torch


def test_render_benchmark_prints_a_row_per_size(bench_render, capsys):
    threads = torch.get_num_threads()
    try:
        assert bench_render.main(["--sizes", "14x14", "96x64", "--repeats", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    table = capsys.readouterr().out.split("\n\n")[-1]
    rows = [
        line.strip("|").split("|")
        for line in table.splitlines()
        if line.startswith("| ") and "x" in line[:10]
    ]
    assert [row[0].strip() for row in rows] == ["14x14", "96x64"]
    for row in rows:
        assert row[6].strip() == "yes"
        assert int(row[4]) > 0 and int(row[5]) > 0
    # beyond a few hundred pixels the palette PNG is the smaller file (its palette costs 768 bytes)
    assert int(rows[1][5]) < int(rows[1][4])
