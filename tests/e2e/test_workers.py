"""``serve --workers 2``: two worker processes behind one port, and /metrics counts for both."""

from __future__ import annotations

import os
import signal

import httpx
import psutil

from tests.e2e.test_overload_and_drain import IMAGES, _wait_for

REQUESTS = 40
PREDICT = {"method": "POST", "route": "/v1/models/{name}/predict", "status": "200"}


def _workers(pid: int) -> list[psutil.Process]:
    """uvicorn's worker processes (multiprocessing spawn children, not its resource tracker)."""
    children = psutil.Process(pid).children(recursive=True)
    return [child for child in children if "spawn_main" in " ".join(child.cmdline())]


def test_metrics_sum_over_all_workers(start_server):
    """Each worker with its own copy of the model (``--engine per-worker``)."""
    server = start_server({}, serve_args=("--workers", "2", "--engine", "per-worker"))
    workers = _workers(server.pid)
    assert len(workers) == 2, [w.cmdline() for w in workers]
    directory = workers[0].environ()["PROMETHEUS_MULTIPROC_DIR"]
    assert os.path.isdir(directory)
    # /readyz passes as soon as one worker serves; model_ready is the minimum over the live workers
    # that have written it, so first wait until both have (a worker still importing has no file)
    _wait_for(
        lambda: all(
            os.path.exists(os.path.join(directory, f"gauge_livemin_{worker.pid}.db")) for worker in workers
        ),
        "both workers reporting model_ready",
        server,
        timeout_s=60,
    )
    _wait_for(
        lambda: server.metric("reciprocam_model_ready", model="tiny") == 1,
        "every worker serving the model",
        server,
        timeout_s=60,
    )
    # a new connection per request, so that both workers take some of them
    for index in range(REQUESTS):
        response = httpx.post(
            f"{server.url}/v1/models/tiny/predict",
            content=IMAGES[index % len(IMAGES)],
            headers={"content-type": "image/png", "connection": "close"},
        )
        assert response.status_code == 200, response.text
    # every scrape, whichever worker answers it, reports the requests of both
    for _ in range(6):
        assert server.metric("reciprocam_http_requests_total", **PREDICT) == REQUESTS
        assert server.metric("reciprocam_images_total", kind="predict", model="tiny") == REQUESTS
        assert server.metric("reciprocam_model_ready", model="tiny") == 1
        assert server.metric("reciprocam_queue_depth_images", model="tiny") == 0
    # a graceful stop ends both workers and removes the directory the server made
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0, server.log()
    assert not any(worker.is_running() for worker in workers)
    assert not os.path.exists(directory)
