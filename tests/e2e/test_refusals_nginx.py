"""The burst of tests/e2e/test_refusals.py through the deployment's nginx load balancer: 1,000 uploads
at once against two replicas with small limits. Every client gets 200 or a JSON 503 with
Retry-After (the replicas' own, or nginx's ``no_replica_available`` while it holds both replicas
out after their 503s), no replica resets a connection under nginx, and the service serves again
afterwards. nginx, its configuration and the replicas are those of tests/e2e/test_nginx_lb.py.

nginx reads each upload whole before it passes it on in one piece, and closes its own client
connections lingering, so it also shielded clients from the resets that replicas used to send with
an early refusal; this checks the deployment, and that the replicas' refusals reach nginx intact."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_nginx_lb import MODEL_NAME, Nginx, Replica, _replica_env, _tail, nginx_binary
from tests.e2e.test_overload_and_drain import _enough_file_descriptors
from tests.e2e.test_refusals import BURST, CONCURRENT, QUEUE, check_answers, noisy_jpeg, upload_burst
from tests.helpers import free_port, save_self_describing

__all__ = ["nginx_binary"]  # the fixture, shared with test_nginx_lb.py


@pytest.fixture(scope="module")
def limited_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    workdir = tmp_path_factory.mktemp("limited-replicas")
    weights = save_self_describing(workdir / "tiny.safetensors", "deit_tiny", seed=3)
    env = {
        **_replica_env(weights, workdir),
        "RECIPROCAM_BATCH__MAX_QUEUE_IMAGES": str(QUEUE),
        "RECIPROCAM_BATCH__MAX_WAIT_MS": "2",
        "RECIPROCAM_LIMITS__MAX_CONCURRENT_REQUESTS": str(CONCURRENT),
        "RECIPROCAM_LOG_LEVEL": "warning",
    }
    pool = [Replica(name, free_port(), env, workdir / f"replica-{name}.log") for name in ("a", "b")]
    try:
        for replica in pool:
            replica.start()
        for replica in pool:
            replica.wait_ready()
        yield pool
    finally:
        for replica in pool:
            replica.stop()


@pytest.mark.slow  # two replicas and nginx, 1,000 connections each way: about two minutes on 2 cores
def test_every_client_of_a_burst_through_nginx_gets_its_answer(
    nginx_binary: str, limited_replicas: list[Replica]
) -> None:
    _enough_file_descriptors(4 * BURST + 200)  # nginx holds a connection each way per request
    prefix = Path(tempfile.mkdtemp(prefix="reciprocam-nginx-"))
    nginx = Nginx(nginx_binary, prefix, free_port())
    try:
        nginx.start([replica.address for replica in limited_replicas])
        body = noisy_jpeg()
        answers = check_answers(asyncio.run(upload_burst(nginx.url, BURST, body)))
        print(f"burst of {BURST} through nginx: {dict(answers)}")
        assert sum(answers.values()) == BURST
        assert answers["200"] > 0 and sum(n for kind, n in answers.items() if kind != "200") > 0
        # nginx read every replica's answer: no replica reset a connection it was sending on
        errors = _tail(nginx.error_log, 200_000)
        assert "reset by peer" not in errors and "prematurely closed" not in errors, errors[-4000:]
        # serving again, once nginx takes the replicas back (fail_timeout after their 503s)
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=60) as client:
            while True:
                again = client.post(
                    f"{nginx.url}/v1/models/{MODEL_NAME}/predict",
                    files={"file": ("again.jpg", body, "image/jpeg")},
                )
                if again.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        assert again.status_code == 200, again.text
        assert all(replica.running() for replica in limited_replicas)
    finally:
        nginx.stop()
        shutil.rmtree(prefix, ignore_errors=True)


@pytest.mark.parametrize(
    ("path", "shape"),
    [(f"/v1/models/{MODEL_NAME}/predict", "service"), (f"/v2/models/{MODEL_NAME}/infer", "oip")],
)
def test_an_upload_over_the_limit_gets_a_json_413_from_nginx(
    nginx_binary: str, path: str, shape: str
) -> None:
    """nginx refuses an upload over client_max_body_size itself, in the error shape of the path's API
    (not its own HTML page), under the caller's request id, and the client, which sends its whole
    body first, gets that answer."""
    prefix = Path(tempfile.mkdtemp(prefix="reciprocam-nginx-"))
    nginx = Nginx(nginx_binary, prefix, free_port())
    try:
        nginx.start([f"127.0.0.1:{free_port()}"])  # never asked
        with httpx.Client(timeout=60) as client:
            response = client.post(
                f"{nginx.url}{path}",
                content=bytes(20 * 1024 * 1024 + 1),
                headers={"content-type": "application/octet-stream", "x-request-id": "big-1"},
            )
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-request-id"] == "big-1"
        if shape == "service":
            assert response.json()["error"] == {
                "code": "payload_too_large",
                "message": "the request body is larger than the limit of 20 MiB",
                "request_id": "big-1",
            }
        else:
            assert response.json() == {"error": "the request body is larger than the limit of 20 MiB"}
    finally:
        nginx.stop()
        shutil.rmtree(prefix, ignore_errors=True)
