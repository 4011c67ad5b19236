"""The HTTP API on Ray Serve: every endpoint over real parts, keys and roles, bad input."""

from __future__ import annotations

import httpx
import pytest
from api_fixtures import ApiServer

pytestmark = [pytest.mark.integration, pytest.mark.model]


def _client(api: ApiServer, key: str | None = None) -> httpx.Client:
    headers = {"X-API-Key": key or api.read_key}
    return httpx.Client(base_url=api.url, headers=headers, timeout=60)


def test_health_needs_no_key(api_server: ApiServer) -> None:
    r = httpx.get(api_server.url + "/v1/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["components"]["model"]["status"] == "ok"
    assert body["components"]["llm"]["status"] == "ok"
