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


async def test_security_headers(client: httpx.AsyncClient) -> None:
    """Every answer forbids content sniffing; the demo page and its files also carry a
    Content-Security-Policy of their own origin only (the browser test runs the page under it),
    refuse framing and send no Referer; the API and /docs carry no page policy."""
    for path in ("/", "/static/app.js"):
        response = await client.get(path)
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy, path
        assert "unsafe-inline" not in policy
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-content-type-options"] == "nosniff"
    for path in ("/v1/models", "/healthz", "/docs", "/v3/nothing"):
        response = await client.get(path)
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert "content-security-policy" not in response.headers, path
