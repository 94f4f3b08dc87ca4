"""uvicorn's HTTP protocol, with the one answer it writes itself, before any application runs (a
request line or headers that cannot be parsed), in the service's JSON error shape instead of plain
text. ``serve`` names this class by import path."""

from __future__ import annotations

import json
import uuid

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.api.errors import error_body
from app.api.middleware import NOSNIFF, REQUEST_ID_HEADER


class JsonErrorsHttpToolsProtocol(HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:
        request_id = uuid.uuid4().hex
        body = json.dumps(
            error_body("bad_request", f"the request is not valid HTTP: {msg}", request_id)
        ).encode()
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head.extend(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers)
        head.extend(
            name + b": " + value + b"\r\n"
            for name, value in (
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode("ascii")),
                (REQUEST_ID_HEADER.encode(), request_id.encode()),
                NOSNIFF,
                (b"connection", b"close"),
            )
        )
        self.transport.write(b"".join([*head, b"\r\n", body]))
        self.transport.close()
