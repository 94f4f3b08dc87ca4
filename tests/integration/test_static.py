"""The demo page and its static files are served."""

from __future__ import annotations

import httpx


async def test_demo_page_and_assets_are_served(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    for fragment in (
        'id="model"',
        'id="file"',
        'id="canvas"',
        'id="error"',
        "/static/app.js",
        "/static/style.css",
    ):
        assert fragment in html

    script = await client.get("/static/app.js")
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert "/v1/models" in script.text

    style = await client.get("/static/style.css")
    assert style.status_code == 200
    assert style.headers["content-type"].startswith("text/css")
    assert "@media" in style.text

    missing = await client.get("/static/nope.js")
    assert missing.status_code == 404
    assert "/" not in (await client.get("/openapi.json")).json()["paths"]
