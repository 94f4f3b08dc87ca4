"""Smoke test of the decode benchmark: a complete table, and the reduced decode only where it applies."""

from __future__ import annotations

import torch


def test_decode_benchmark_prints_a_row_per_size(bench_decode, capsys):
    module = bench_decode

    threads = torch.get_num_threads()
    try:
        assert module.main(["--sizes", "96x64", "640x480", "--input-size", "32", "--repeats", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    table = capsys.readouterr().out.split("\n\n")[-1]
    rows = [
        line.strip("|").split("|")
        for line in table.splitlines()
        if line.startswith("| ") and "x" in line[:12]
    ]
    assert [row[0].strip() for row in rows] == ["96x64", "640x480"]
    small, large = rows
    assert float(small[5]) == 0.0  # too small to reduce: the same pixels
    assert float(large[5]) > 0.0  # reduced: close, not identical
    assert float(large[5]) < 2.0
