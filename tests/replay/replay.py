"""Send the recorded requests to an in-process service and reduce each answer to what must not change
(request ids and timings dropped)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from app.config import ModelSettings, Settings
from tests.helpers import save_self_describing
from tests.replay.cases import SHAPES_WEIGHTS, TINY_LABELS

RECORDING = Path(__file__).with_name("recorded.json")
KEPT_HEADERS = ("content-type", "retry-after", "allow")
TIMINGS = ("queue_ms", "compute_ms", "total_ms")
TINY_WEIGHTS = "<tiny weights>"
_PNG_BASE64 = "iVBORw0KGgo"  # the PNG signature, base64-encoded
# Float sums depend on torch's thread count: the answers are recorded, and replayed, with this many.
THREADS = 2


def replay_settings(tmp_dir: Path) -> tuple[Settings, Path]:
    tiny = save_self_describing(tmp_dir / "tiny.safetensors", "deit_tiny", seed=3, labels=TINY_LABELS)
    settings = Settings(
        models=[
            ModelSettings(name="shapes", weights=SHAPES_WEIGHTS),
            ModelSettings(name="tiny", weights=str(tiny)),
        ],
        # one batch at a time on all THREADS (two streams would compute on half of them each)
        batch={"max_wait_ms": 1, "compute_streams": 1},
        io_workers=2,
        log_format="text",
        tensor_resize=False,  # the recording was made with Pillow's resize
    )
    return settings, tiny


async def answer(client: httpx.AsyncClient, case: dict[str, Any], tiny_path: Path) -> dict[str, Any]:
    response = await client.request(
        case["method"], case["path"], headers=case["headers"], content=base64.b64decode(case["body"])
    )
    return normalize(response, str(tiny_path))


def normalize(response: httpx.Response, tiny_path: str) -> dict[str, Any]:
    headers = {key: response.headers[key] for key in KEPT_HEADERS if key in response.headers}
    content = response.content
    length = response.headers.get("inference-header-content-length")
    binary = ""
    if length is not None:
        content, tail = content[: int(length)], content[int(length) :]
        binary = base64.b64encode(tail).decode("ascii")
    body: Any
    try:
        body = _scrub(json.loads(content), tiny_path) if content else None
    except ValueError:
        body = {"text": content.decode("utf-8", "replace")}
    return {"status": response.status_code, "headers": headers, "body": body, "binary": binary}


def _scrub(value: Any, tiny_path: str) -> Any:
    if isinstance(value, dict):
        return {
            key: _scrub(item, tiny_path)
            for key, item in value.items()
            if key != "request_id" and key not in TIMINGS
        }
    if isinstance(value, list):
        return [_scrub(item, tiny_path) for item in value]
    if isinstance(value, str) and tiny_path in value:
        return value.replace(tiny_path, TINY_WEIGHTS)
    return value


def same_pictures(answer: Any) -> Any:
    """The answer with each base64 PNG replaced by what it decodes to (mode, size, palette and a
    digest of the pixels): PNG bytes depend on the deflate library, the pictures must not."""
    if isinstance(answer, dict):
        return {key: same_pictures(item) for key, item in answer.items()}
    if isinstance(answer, list):
        return [same_pictures(item) for item in answer]
    if isinstance(answer, str) and answer.startswith(_PNG_BASE64):
        image = Image.open(io.BytesIO(base64.b64decode(answer)))
        image.load()
        palette = image.palette.tobytes() if image.palette is not None else b""
        digest = hashlib.sha256(image.tobytes() + b"|" + palette).hexdigest()
        return f"png {image.mode} {image.size[0]}x{image.size[1]} {digest}"
    return answer
