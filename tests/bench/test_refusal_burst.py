"""The refusal-burst script, end to end on a small burst: every client answered, the figures printed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.bench.conftest import benchmark_module


@pytest.fixture
def refusal_burst() -> Iterator[ModuleType]:
    with benchmark_module("refusal_burst") as module:
        yield module


def test_a_small_burst_is_answered_and_measured(refusal_burst, tmp_path, capsys):
    out = tmp_path / "burst.json"
    args = ["--clients=120", "--queue=4", "--concurrent=8", "--jpeg-kb=20", "--json", str(out)]
    assert refusal_burst.main(args) == 0
    summary = json.loads(out.read_text())
    assert summary["clients"] == summary["answered"] == 120
    assert summary["connection_errors"] == 0
    answers = summary["answers"]
    assert answers.get("200", 0) > 0 and answers.get("503 overloaded", 0) > 0, answers
    assert set(answers) <= {"200", "503 overloaded", "503 queue_full"}, answers
    assert summary["server_cpu_s"] > 0
    assert 0 < summary["rss_before_mib"] <= summary["rss_peak_mib"]
    assert summary["readyz_after"] == summary["predict_after"] == 200
    assert "server_cpu_s" in capsys.readouterr().out


def test_a_refusal_without_retry_after_or_json_is_told_apart(refusal_burst):
    import httpx

    request = httpx.Request("POST", "http://test/v1/models/tiny/predict")
    plain = httpx.Response(503, text="Service Unavailable", request=request)
    assert refusal_burst.classify(plain) == "503 not JSON no Retry-After"
    shaped = httpx.Response(
        503, json={"error": {"code": "overloaded"}}, headers={"retry-after": "1"}, request=request
    )
    assert refusal_burst.classify(shaped) == "503 overloaded"
    assert refusal_burst.classify(httpx.Response(200, request=request)) == "200"
