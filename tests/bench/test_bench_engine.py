"""Smoke test of the engine benchmark script: one tiny run prints a complete table."""

from __future__ import annotations

import torch


def test_benchmark_prints_table(bench_engine, capsys, monkeypatch):
    module = bench_engine
    # Keep the allocator settings of the test process: no peak-RSS measurement here.
    monkeypatch.setattr(module, "_configure_glibc", lambda: False)
    threads = torch.get_num_threads()
    try:
        code = module.main(
            [
                "--device=cpu",
                "--models=deit_tiny_patch16_224",
                "--batch=1",
                "--iters=1",
                "--warmup=0",
                "--reference-iters=0",
                "--threads=1",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0
    assert "(reduced)" in out  # the default engine took the reduced path
    rows = [line for line in out.splitlines() if line.startswith("| deit_tiny_patch16_224 | fp32 | 1 |")]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert float(cells[3]) > 0 and float(cells[4]) > 0 and cells[5] == "n/a"
