"""What a readiness probe sees after SIGTERM (docs/service.md, Shutdown): uvicorn closes the listener
at once, so a probe on a new connection is refused rather than answered 503 ``draining``; only the
moment between the signal and the listener closing can answer ``draining``. Accepted work finishes."""

from __future__ import annotations

import signal
import threading
import time

import httpx

from tests.e2e.test_overload_and_drain import IMAGES


def test_after_sigterm_probes_are_refused_and_accepted_work_finishes(start_server):
    server = start_server({"drain_timeout_s": 30}, delay_s=1.5)
    answers: dict[str, httpx.Response | Exception] = {}

    def slow() -> None:
        try:
            answers["slow"] = httpx.post(
                f"{server.url}/v1/models/tiny/predict",
                content=IMAGES[0],
                headers={"content-type": "image/png"},
                timeout=60,
            )
        except Exception as exc:  # the assertion below reports it
            answers["slow"] = exc

    worker = threading.Thread(target=slow)
    worker.start()
    deadline = time.monotonic() + 30
    while server.metric("reciprocam_queue_depth_images", model="tiny") < 1 and not _computing(server):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    server.process.send_signal(signal.SIGTERM)
    probes: list[str] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{server.url}/readyz", timeout=5)
            probes.append(f"{response.status_code} {response.json()['status']}")
        except httpx.TransportError:
            probes.append("refused")
            break
        time.sleep(0.02)
    worker.join(60)
    # refused, after at most the instant between the signal and the listener closing
    assert probes and probes[-1] == "refused", probes
    assert set(probes[:-1]) <= {"503 draining"}, probes
    assert isinstance(answers["slow"], httpx.Response) and answers["slow"].status_code == 200, answers
    assert server.process.wait(timeout=60) == 0, server.log()


def _computing(server) -> bool:
    """The request has left the queue for the (delayed) batch."""
    return server.metric("reciprocam_batch_size_images_count", model="tiny") > 0 or (
        server.metric("reciprocam_queue_wait_seconds_count", model="tiny") > 0
    )
