"""Smoke test of the host-cost benchmark: a row per configuration, every stage accounted for."""

from __future__ import annotations

from tests.bench.conftest import run_table


def test_host_cost_prints_a_row_per_configuration(host_cost, capsys):
    rows = run_table(
        host_cost,
        [
            "--arch",
            "deit_tiny_patch16_224",
            "--model-kwargs",
            '{"img_size": 32, "patch_size": 8}',
            "--image-size",
            "64",
            "--requests",
            "8",
            "--concurrency",
            "4",
            "--rounds",
            "2",
            "--variant",
            '{"inline_io_max_pixels": 0}',
        ],
        capsys,
    )
    assert [row[0] for row in rows] == ["defaults", '{"inline_io_max_pixels": 0}']
    for row in rows:
        cpu, by_round, loop = float(row[1]), row[2].split(), float(row[3])
        parse, decode, preprocess, render = (float(cell) for cell in row[4:8])
        assert len(by_round) == 2 and cpu > 0 and loop > 0
        assert min(parse, decode, preprocess, render) > 0
        # the stages' CPU is part of the process's
        assert parse + decode + preprocess + render < cpu
    # by default these small requests are decoded and rendered on the event loop's thread: its CPU
    # covers the stages
    defaults = rows[0]
    assert float(defaults[3]) > sum(float(cell) for cell in defaults[4:8])
