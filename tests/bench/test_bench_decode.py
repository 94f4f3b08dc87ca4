"""Smoke test of the decode benchmark: a complete table, and the shortcuts only where they apply."""

from __future__ import annotations

from tests.bench.conftest import run_table


def test_decode_benchmark_prints_a_row_per_format_and_size(bench_decode, capsys):
    args = ["--formats", "JPEG", "PNG", "--sizes", "96x64", "640x480", "--input-size", "32", "--repeats", "1"]
    rows = run_table(bench_decode, [*args, "--pillow-resize"], capsys)
    assert [(row[0], row[1]) for row in rows] == [
        ("JPEG", "96x64"),
        ("JPEG", "640x480"),
        ("PNG", "96x64"),
        ("PNG", "640x480"),
    ]
    for fmt, small, large in (("JPEG", rows[0], rows[1]), ("PNG", rows[2], rows[3])):
        assert float(small[6]) == 0.0, fmt  # too small for either shortcut: the same pixels
        assert 0.0 < float(large[6]) < 2.0, fmt  # reduced decode (JPEG) or two-step resize (PNG): close
    # the default resize, torch's kernels: a small image differs by rounding only
    small_only = ["--formats", "JPEG", "PNG", "--sizes", "96x64", "--input-size", "32", "--repeats", "1"]
    for small in run_table(bench_decode, small_only, capsys):
        assert float(small[6]) < 0.1 and int(small[7]) <= 2


def test_decode_benchmark_can_add_the_window_resize(bench_decode, capsys):
    """With --window-resize the fast variant resizes only the crop window, which applies at any
    size: a small photo-like image then differs from the exact path, by rounding only."""
    args = ["--formats", "PNG", "--sizes", "61x97", "--input-size", "32", "--repeats", "1", "--pillow-resize"]
    (plain,) = run_table(bench_decode, args, capsys)
    (window,) = run_table(bench_decode, [*args, "--window-resize"], capsys)
    assert float(plain[6]) == 0.0 and int(plain[7]) == 0
    assert 0.0 < float(window[6]) < 0.5 and int(window[7]) <= 3
