"""Smoke test of the decode benchmark: a complete table, and the shortcuts only where they apply."""

from __future__ import annotations

from tests.bench.conftest import run_table


def test_decode_benchmark_prints_a_row_per_format_and_size(bench_decode, capsys):
    args = ["--formats", "JPEG", "PNG", "--sizes", "96x64", "640x480", "--input-size", "32", "--repeats", "1"]
    rows = run_table(bench_decode, args, capsys)
    assert [(row[0], row[1]) for row in rows] == [
        ("JPEG", "96x64"),
        ("JPEG", "640x480"),
        ("PNG", "96x64"),
        ("PNG", "640x480"),
    ]
    for fmt, small, large in (("JPEG", rows[0], rows[1]), ("PNG", rows[2], rows[3])):
        # too small for reduced decoding or two steps; only the crop window is resized: rounding apart,
        # the same pixels
        assert float(small[6]) < 0.5 and int(small[7]) <= 3, fmt
        assert 0.0 < float(large[6]) < 2.0, fmt  # reduced decode (JPEG) or two-step resize (PNG): close
