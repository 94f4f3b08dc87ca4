"""The benchmark scripts, loaded as modules for their smoke tests."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@contextmanager
def benchmark_module(name: str) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` as a module, registered in ``sys.modules`` while in use (dataclasses
    and pickling look a module up there)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous


def run_tables(
    module: ModuleType, args: list[str], capsys: pytest.CaptureFixture[str], count: int = 1
) -> list[list[list[str]]]:
    """Run a benchmark's ``main(args)`` (restoring torch's thread count) and return the body rows of
    the last ``count`` markdown tables it prints, each row as a list of stripped cells."""
    import torch

    threads = torch.get_num_threads()
    try:
        assert module.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    tables = []
    for block in capsys.readouterr().out.split("\n\n")[-count:]:
        body = [line for line in block.splitlines() if line.startswith("| ")][1:]  # past the header row
        tables.append([[cell.strip() for cell in line.strip().strip("|").split("|")] for line in body])
    return tables


def run_table(module: ModuleType, args: list[str], capsys: pytest.CaptureFixture[str]) -> list[list[str]]:
    """The body rows of the table a benchmark prints last (see :func:`run_tables`)."""
    return run_tables(module, args, capsys)[0]


@pytest.fixture
def bench_engine() -> Iterator[ModuleType]:
    with benchmark_module("bench_engine") as module:
        yield module


@pytest.fixture
def bench_decode() -> Iterator[ModuleType]:
    with benchmark_module("bench_decode") as module:
        yield module


@pytest.fixture
def bench_render() -> Iterator[ModuleType]:
    with benchmark_module("bench_render") as module:
        yield module


@pytest.fixture(scope="module")
def load_test() -> Iterator[ModuleType]:
    with benchmark_module("load_test") as module:
        yield module


@pytest.fixture
def host_cost() -> Iterator[ModuleType]:
    with benchmark_module("host_cost") as module:
        yield module
