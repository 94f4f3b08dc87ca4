"""Reading a multipart body in memory: the same parts as Starlette's form parser finds (the plain
reference), and every malformed or oversized body refused with a reason."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from starlette.datastructures import UploadFile
from starlette.requests import Request

from app.api.multipart import MultipartError, TooManyFiles, read_parts

LIMITS = {"max_files": 8, "max_fields": 16, "max_field_bytes": 1024}


def _body(files: list, data: dict | None = None) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", files=files, data=data or {})
    return request.read(), request.headers["content-type"]


def _starlette(body: bytes, content_type: str) -> list[tuple[str, str | None, bytes | str]]:
    async def read() -> list[tuple[str, str | None, bytes | str]]:
        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode())]}
        form = await Request(scope, receive).form()
        items = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                items.append((name, value.filename, await value.read()))
            else:
                items.append((name, None, value))
        await form.close()
        return items

    return asyncio.run(read())


def _ours(body: bytes, content_type: str) -> list[tuple[str, str | None, bytes | str]]:
    parts = read_parts(body, content_type, **LIMITS)
    return [(p.name, p.filename, p.data if p.filename is not None else p.text) for p in parts]


def test_the_parts_equal_starlettes():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=20_000, dtype=np.uint8).tobytes()
    cases = [
        _body([("file", ("a.jpg", noise, "image/jpeg"))]),
        _body(
            [
                ("files", ("0.png", noise[:100], "image/png")),
                ("files", ("1.png", noise[100:5000], "image/png")),
            ],
            {"top_k": "3", "encodings": "heatmap,png", "targets": ["1", "2"]},
        ),
        # bytes that look like the start of a delimiter inside a file
        _body(
            [
                (
                    "file",
                    ("x.bin", b"\r\n--\r\n--x\r\n\r\n" + noise[:50] + b"\r\n-", "application/octet-stream"),
                )
            ]
        ),
        _body([("file", ("ünïcødé naïve.png", b"\x89PNG", "image/png"))], {"note": "héllo wörld"}),
        _body([("file", ("empty.png", b"", "image/png"))], {"empty": ""}),
    ]
    for body, content_type in cases:
        ours = _ours(body, content_type)
        assert ours and ours == _starlette(body, content_type)


def test_a_hand_written_body_with_a_charset():
    body = (
        b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\ncaf\xe9\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG\r\n--b--\r\n"
    )
    parts = read_parts(body, "multipart/form-data; boundary=b; charset=latin-1", **LIMITS)
    assert [(p.name, p.filename) for p in parts] == [("note", None), ("file", "x.png")]
    assert parts[0].text == "café" and parts[1].data == b"\x89PNG"
    # a charset Python does not know reads as latin-1; undecodable UTF-8 falls back to it too
    unknown = read_parts(body, "multipart/form-data; boundary=b; charset=klingon", **LIMITS)
    assert unknown[0].text == "café"
    assert read_parts(body, "multipart/form-data; boundary=b", **LIMITS)[0].text == "café"


@pytest.mark.parametrize(
    "body, content_type, error",
    [
        (b"--b--\r\n", "multipart/form-data", MultipartError),  # no boundary
        (  # cut short: no closing delimiter
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n\x89PNG',
            "multipart/form-data; boundary=b",
            MultipartError,
        ),
        (  # a part without a name
            b'--b\r\nContent-Disposition: form-data; filename="x.png"\r\n\r\nxx\r\n--b--\r\n',
            "multipart/form-data; boundary=b",
            MultipartError,
        ),
        (  # no Content-Disposition at all
            b"--b\r\nContent-Type: image/png\r\n\r\nxx\r\n--b--\r\n",
            "multipart/form-data; boundary=b",
            MultipartError,
        ),
        (b"garbage that is no multipart\r\n--b--\r\n", "multipart/form-data; boundary=b", MultipartError),
    ],
)
def test_malformed_bodies_are_refused(body, content_type, error):
    with pytest.raises(error):
        read_parts(body, content_type, **LIMITS)


def test_the_limits():
    files = [("files", (f"{i}.png", b"x" * 3000, "image/png")) for i in range(LIMITS["max_files"])]
    body, content_type = _body(files)
    assert len(read_parts(body, content_type, **LIMITS)) == LIMITS["max_files"]  # files have no size limit
    body, content_type = _body([*files, ("files", ("one-more.png", b"x", "image/png"))])
    with pytest.raises(TooManyFiles):
        read_parts(body, content_type, **LIMITS)
    body, content_type = _body([files[0]], {f"f{i}": "1" for i in range(LIMITS["max_fields"] + 1)})
    with pytest.raises(MultipartError) as info:
        read_parts(body, content_type, **LIMITS)
    assert not isinstance(info.value, TooManyFiles)
    body, content_type = _body([files[0]], {"note": "y" * LIMITS["max_field_bytes"]})
    texts = {part.name: part.text for part in read_parts(body, content_type, **LIMITS)}
    assert texts["note"] == "y" * LIMITS["max_field_bytes"]
    body, content_type = _body([files[0]], {"note": "y" * (LIMITS["max_field_bytes"] + 1)})
    with pytest.raises(MultipartError):
        read_parts(body, content_type, **LIMITS)
