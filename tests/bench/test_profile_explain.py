"""Smoke test of the profiling script on the CPU: both profiler tables, on the reduced path."""

from __future__ import annotations

import torch

from tests.bench.conftest import benchmark_module


def test_profile_prints_explain_and_forward_tables(capsys):
    threads = torch.get_num_threads()
    try:
        with benchmark_module("profile_explain") as module:
            code = module.main(["--device=cpu", "--model=deit_tiny_patch16_224", "--batch=1", "--iters=1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0
    assert "path reduced" in out
    explain, forward = out.index("== explain (top-1): 1 calls"), out.index("== forward: 1 calls")
    assert explain < forward
    # each section holds a profiler table with the model's matrix products in it
    assert "aten::linear" in out[explain:forward] and "aten::linear" in out[forward:]
    assert "host waits" not in out  # CUDA only
