"""``serve --workers 2``: two worker processes behind one port, and /metrics counts for both."""

from __future__ import annotations

import httpx
import psutil

from tests.e2e.test_overload_and_drain import IMAGES

REQUESTS = 40
PREDICT = {"method": "POST", "route": "/v1/models/{name}/predict", "status": "200"}


def test_metrics_sum_over_all_workers(start_server):
    server = start_server({}, serve_args=("--workers", "2"))
    workers = [p for p in psutil.Process(server.pid).children(recursive=True) if "python" in p.name()]
    assert len(workers) >= 2, workers
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
