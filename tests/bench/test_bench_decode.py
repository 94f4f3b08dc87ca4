"""Smoke test of the decode benchmark: a complete table, and the shortcuts only where they apply."""

from __future__ import annotations

import torch


def test_decode_benchmark_prints_a_row_per_format_and_size(bench_decode, capsys):
    threads = torch.get_num_threads()
    try:
        args = [
            "--formats",
            "JPEG",
            "PNG",
            "--sizes",
            "96x64",
            "640x480",
            "--input-size",
            "32",
            "--repeats",
            "1",
        ]
        assert bench_decode.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    table = capsys.readouterr().out.split("\n\n")[-1]
    rows = [
        line.strip("|").split("|")
        for line in table.splitlines()
        if line.startswith("| JPEG") or line.startswith("| PNG")
    ]
    assert [(row[0].strip(), row[1].strip()) for row in rows] == [
        ("JPEG", "96x64"),
        ("JPEG", "640x480"),
        ("PNG", "96x64"),
        ("PNG", "640x480"),
    ]
    for fmt, small, large in (("JPEG", rows[0], rows[1]), ("PNG", rows[2], rows[3])):
        assert float(small[6]) == 0.0, fmt  # too small for either shortcut: the same pixels
        assert 0.0 < float(large[6]) < 2.0, fmt  # reduced decode (JPEG) or two-step resize (PNG): close
