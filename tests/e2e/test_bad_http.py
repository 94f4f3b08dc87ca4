"""What uvicorn answers itself, before the application runs (a request that is not HTTP), has the
service's JSON error shape too."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx


def _raw_exchange(port: int, payload: bytes) -> tuple[str, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(payload)
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status_line, headers, body


def test_an_unparsable_request_gets_a_json_400(start_server: Any) -> None:
    server = start_server({})
    for payload in (b"NOT HTTP AT ALL\r\n\r\n", b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"):
        status_line, headers, body = _raw_exchange(server.port, payload)
        assert status_line.startswith("HTTP/1.1 400"), status_line
        assert headers["content-type"] == "application/json"
        assert headers["x-content-type-options"] == "nosniff"
        error = json.loads(body)["error"]
        assert error["code"] == "bad_request" and "not valid HTTP" in error["message"]
        assert error["request_id"] == headers["x-request-id"]
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200  # still serving
