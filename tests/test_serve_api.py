"""The HTTP API on Ray Serve: every endpoint over real parts, keys and roles, bad input."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from api_fixtures import API_MAX_NEW_TOKENS, API_MAX_PROMPT_TOKENS, API_SWARM, ApiServer

from rayfin.serve.app import openapi_spec
from rayfin.trading.inputs import required_columns
from rayfin.trading.ledger import Ledger
from rayfin.trading.orders import Signal
from rayfin.trading.registry import ModelRegistry
from rayfin.trading.strategy import StrategyConfig, ThresholdStrategy

pytestmark = [pytest.mark.integration, pytest.mark.model]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def http(api_server: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=api_server.url, headers={"X-API-Key": api_server.read_key}, timeout=120
    ) as client:
        yield client


def _row(api: ApiServer, i: int) -> dict[str, Any]:
    """Held-out feature row ``i`` as a /v1/score body, with what the model needs."""
    row = api.features.iloc[i]
    needed = {c for name in api.model.features for c in required_columns(name)} - {"price"}
    return {
        "symbol": str(row["symbol"]),
        "price": float(row["price"]),
        # JSON has no NaN: a window not warm yet is null.
        "features": {
            name: None if pd.isna(row[name]) else float(row[name]) for name in sorted(needed)
        },
    }


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    return body["error"]["message"]


# --- operations ---------------------------------------------------------------------------


def test_health_needs_no_key(api_server: ApiServer) -> None:
    r = httpx.get(api_server.url + "/v1/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert {name: c["status"] for name, c in body["components"].items()} == {
        "ledger": "ok",
        "model": "ok",
        "llm": "ok",
    }


def test_openapi_is_served_and_the_committed_spec_is_current(api_server: ApiServer) -> None:
    served = httpx.get(api_server.url + "/openapi.json").json()
    assert served == openapi_spec()
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert committed == served, "docs/openapi.json is stale: rayfin serve openapi --out ..."
    paths = served["paths"]
    for path in (
        "/v1/score", "/v1/score/batch", "/v1/decisions", "/v1/orders", "/v1/positions",
        "/v1/pnl", "/v1/models", "/v1/models/{version}/promote", "/v1/sentiment",
        "/v1/generate", "/v1/health", "/v1/pipeline", "/metrics",
    ):  # fmt: skip
        assert path in paths
    assert served["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    example = served["components"]["schemas"]["ScoreRow"]["examples"][0]
    assert example["symbol"] == "ES"


def test_metrics_count_requests_by_route(api_server: ApiServer, http: httpx.Client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    for _ in range(3):
        http.get("/v1/positions").raise_for_status()

    def counted() -> float:
        text = httpx.get(api_server.url + "/metrics").text
        total = 0.0
        for family in text_string_to_metric_families(text):
            if family.name == "ray_rayfin_serve_requests":
                total += sum(
                    s.value
                    for s in family.samples
                    if s.labels.get("route") == "/v1/positions" and s.labels.get("status") == "200"
                )
        return total

    deadline = time.monotonic() + 60
    while counted() < 3:
        assert time.monotonic() < deadline, "the request counter never reached /metrics"
        time.sleep(1)
    assert (
        "ray_rayfin_serve_request_latency_seconds_bucket"
        in httpx.get(api_server.url + "/metrics").text
    )


def test_pipeline_reports_the_named_trader(api_server: ApiServer, http: httpx.Client) -> None:
    import ray

    from rayfin.actors.trader import TRADER_ACTOR, launch_trader

    assert http.get("/v1/pipeline").json()["trader"] is None
    trader = launch_trader(
        api_server.model,
        ledger_url=f"sqlite:///{api_server.registry.parent / 'pipeline.db'}",
        actor_name=TRADER_ACTOR,
        num_cpus=0,
    )
    try:
        body = http.get("/v1/pipeline").json()
        assert body["trader"]["records"] == 0
        assert body["trader"]["risk_state"] == "active"
        assert body["consumers"] == 0
        assert body["llm"]["swarm"] == API_SWARM
    finally:
        ray.kill(trader)


# --- scoring ------------------------------------------------------------------------------


def test_score_matches_the_model_and_the_strategy(
    api_server: ApiServer, http: httpx.Client
) -> None:
    body = _row(api_server, 500)
    r = http.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    result = r.json()
    ref = result["model"]
    model = ModelRegistry(api_server.registry).load(ref["name"], ref["version"])
    frame = pd.DataFrame([{**body["features"], "price": body["price"]}]).astype(float)
    expected = model.predict_proba(frame)[0]
    p = result["probabilities"]
    np.testing.assert_allclose([p["down"], p["flat"], p["up"]], expected, atol=1e-12)
    # The decision is the strategy's for a flat position.
    total = float(expected.sum())
    signal = Signal("ES", 1, body["price"], tuple(expected / total), _source(), 0.0)
    strategy = ThresholdStrategy(StrategyConfig(threshold=result["decision"]["threshold"]))
    proposal = strategy.decide(signal, 0)
    decision = result["decision"]
    if proposal.order is None:
        assert decision == {
            "action": "hold", "quantity": 0, "purpose": None, "reason": proposal.reason,
            "threshold": decision["threshold"],
        }  # fmt: skip
    else:
        assert decision["action"] == ("buy" if int(proposal.order.side) > 0 else "sell")
        assert decision["quantity"] == proposal.order.quantity


def _source() -> Any:
    from rayfin.trading.orders import SourceKey

    return SourceKey("test", 0, 0)


def test_a_batch_scores_like_single_rows(api_server: ApiServer, http: httpx.Client) -> None:
    rows = [_row(api_server, i) for i in (100, 2_000, 5_000)]
    rows[1]["position"] = 1
    batch = http.post("/v1/score/batch", json={"rows": rows}).json()
    assert len(batch["results"]) == 3
    for row, result in zip(rows, batch["results"], strict=True):
        single = http.post("/v1/score", json=row).json()
        assert single["probabilities"] == result["probabilities"]
        assert single["decision"] == result["decision"]


def test_missing_features_are_named(api_server: ApiServer, http: httpx.Client) -> None:
    body = _row(api_server, 10)
    dropped = sorted(body["features"])[:2]
    for name in dropped:
        del body["features"][name]
    message = _error(http.post("/v1/score", json=body), 422, "missing_features")
    for name in dropped:
        assert name in message


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"price": -1.0}, "body.price"),
        ({"symbol": ""}, "body.symbol"),
        ({"sentiment": 2.0}, "body.sentiment"),
        ({"features": {"sma_20t": "high"}}, "body.features.sma_20t"),
        ({"surprise": 1}, "body.surprise"),
        ({"ts": "2013-09-03T14:30:00"}, "body.ts"),  # no timezone
    ],
)
def test_invalid_bodies_get_422_naming_the_field(
    api_server: ApiServer, http: httpx.Client, change: dict[str, Any], field: str
) -> None:
    body = {**_row(api_server, 10), **change}
    message = _error(http.post("/v1/score", json=body), 422, "validation_error")
    assert field in message


def test_non_finite_numbers_and_broken_json_get_422(
    api_server: ApiServer, http: httpx.Client
) -> None:
    body = json.dumps(_row(api_server, 10)).replace('"price": ', '"price": NaN, "x": ', 1)
    r = http.post("/v1/score", content=body, headers={"content-type": "application/json"})
    _error(r, 422, "validation_error")
    r = http.post("/v1/score", content=b"{not json", headers={"content-type": "application/json"})
    _error(r, 422, "validation_error")
    assert math.isfinite(1.0)


# --- the ledger -----------------------------------------------------------------------------


def test_decision_pages_cover_the_ledger_once(api_server: ApiServer, http: httpx.Client) -> None:
    with Ledger(api_server.ledger_url) as ledger:
        stored = ledger.decisions()
    assert len(stored) > 3
    seen: list[int] = []
    offset: int | None = 0
    while offset is not None:
        page = http.get("/v1/decisions", params={"limit": 2, "offset": offset}).json()
        seen += [item["ts"] for item in page["items"]]
        offset = page["next_offset"]
    assert seen == stored["ts"].tolist()
    newest = http.get("/v1/decisions", params={"order": "desc", "limit": 1}).json()["items"][0]
    assert newest["ts"] == stored["ts"].max()
    assert newest["time"].startswith(pd.Timestamp(newest["ts"], tz="UTC").strftime("%Y-%m-%dT"))


def test_decisions_filter_by_symbol_and_time(api_server: ApiServer, http: httpx.Client) -> None:
    with Ledger(api_server.ledger_url) as ledger:
        stored = ledger.decisions()
    middle = int(stored["ts"].iloc[len(stored) // 2])
    start = pd.Timestamp(middle, tz="UTC").isoformat()
    page = http.get("/v1/decisions", params={"start": start, "limit": 1000}).json()
    assert [d["ts"] for d in page["items"]] == stored.loc[stored["ts"] >= middle, "ts"].tolist()
    assert http.get("/v1/decisions", params={"symbol": "NQ"}).json()["items"] == []
    naive = http.get("/v1/decisions", params={"start": "2013-09-03T14:30:00"})
    assert "timezone" in _error(naive, 422, "validation_error")
    _error(http.get("/v1/decisions", params={"limit": 1001}), 422, "validation_error")


def test_orders_positions_and_pnl_agree_with_the_ledger(
    api_server: ApiServer, http: httpx.Client
) -> None:
    with Ledger(api_server.ledger_url) as ledger:
        orders = ledger.orders()
        positions = ledger.positions()
        marks = {r.symbol: r.last_price for r in positions.itertuples()}
        pnl = ledger.pnl(marks, ts=int(positions["ts"].max()))
    got = http.get("/v1/orders", params={"limit": 1000}).json()["items"]
    assert [o["id"] for o in got] == orders["id"].tolist()
    got = http.get("/v1/positions").json()["items"]
    assert [(p["symbol"], p["quantity"]) for p in got] == list(
        zip(positions["symbol"], positions["quantity"], strict=True)
    )
    body = http.get("/v1/pnl", params={"points": 50}).json()
    assert body["equity"] == pytest.approx(pnl.summary.equity)
    assert body["realized_pnl"] == pytest.approx(pnl.summary.realized_pnl)
    assert body["fees"] == pytest.approx(pnl.summary.fees)
    assert 2 <= len(body["equity_curve"]) <= 50
    assert body["equity_curve"][-1]["equity"] == pytest.approx(pnl.equity_curve["equity"].iloc[-1])


# --- models ---------------------------------------------------------------------------------


def test_upload_promote_and_score_with_the_new_version(
    api_server: ApiServer, http: httpx.Client
) -> None:
    registry = ModelRegistry(api_server.registry)
    listed = http.get("/v1/models").json()
    production = listed["production"]
    assert production in [v["version"] for v in listed["versions"]]
    current = registry.get("market", production)
    upload = {
        "name": "market",
        "model_text": registry.load("market", production).booster.model_to_string(),
        "features": list(current.features),
        "label_spec": current.label_spec.to_dict(),
        "fingerprint": current.fingerprint,
        "metrics": {"note": "uploaded by a test"},
    }
    trade = {"X-API-Key": api_server.trade_key}
    _error(http.post("/v1/models", json=upload), 403, "forbidden")
    created = http.post("/v1/models", json=upload, headers=trade)
    assert created.status_code == 201, created.text
    number = created.json()["version"]
    assert number > production
    _error(http.post(f"/v1/models/{number}/promote"), 403, "forbidden")
    promoted = http.post(f"/v1/models/{number}/promote", headers=trade)
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["aliases"] == ["production"]
    try:
        # Every replica follows the alias within model_refresh_s.
        deadline = time.monotonic() + 10
        while True:
            score = http.post("/v1/score", json=_row(api_server, 3)).json()
            if score["model"]["version"] == number:
                break
            assert time.monotonic() < deadline, score
            time.sleep(0.2)
    finally:
        http.post(f"/v1/models/{production}/promote", headers=trade).raise_for_status()
    _error(http.post("/v1/models/999999/promote", headers=trade), 404, "not_found")
    broken = {**upload, "model_text": "tree\nnot a model"}
    _error(http.post("/v1/models", json=broken, headers=trade), 422, "bad_model")
    wrong = {**upload, "features": ["ret_1", "vol_20t"]}
    _error(http.post("/v1/models", json=wrong, headers=trade), 422, "bad_model")


# --- the LLM --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm_client(api_server: ApiServer) -> Any:
    """A client of the API's swarm in this process: what the API's answers must equal."""
    from rayfin.llm.client import DistributedCausalLM

    return DistributedCausalLM.from_pretrained("smollm2-135m", swarm=API_SWARM)


def test_sentiment_equals_the_scorer_on_the_same_swarm(
    http: httpx.Client, swarm_client: Any
) -> None:
    from rayfin.sentiment.llm import LLMSentimentScorer

    headlines = ["Acme beats estimates and raises guidance", "Acme recalls its products"]
    r = http.post("/v1/sentiment", json={"headlines": headlines})
    assert r.status_code == 200, r.text
    scores = r.json()["scores"]
    direct = LLMSentimentScorer(swarm_client).score(headlines)
    for score, probs in zip(scores, direct, strict=True):
        got = [score["negative"], score["neutral"], score["positive"]]
        np.testing.assert_allclose(got, probs, atol=1e-6)
        assert score["sentiment"] == pytest.approx(probs[2] - probs[0], abs=1e-6)
    too_many = {"headlines": ["x"] * 65}
    _error(http.post("/v1/sentiment", json=too_many), 422, "validation_error")


def test_generate_equals_greedy_generation_on_the_swarm(
    http: httpx.Client, swarm_client: Any
) -> None:
    from rayfin.llm.chat import chat_input_ids

    prompt = "What is the capital of France?"
    r = http.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": API_MAX_NEW_TOKENS})
    assert r.status_code == 200, r.text
    body = r.json()
    tokenizer = swarm_client.tokenizer
    ids = chat_input_ids(tokenizer, prompt)
    out = swarm_client.generate(ids, max_new_tokens=API_MAX_NEW_TOKENS)
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert body["text"] == expected
    assert body["prompt_tokens"] == ids.shape[1]
    assert 0 < body["new_tokens"] <= API_MAX_NEW_TOKENS
    assert body["finish_reason"] in ("stop", "length")


def test_too_long_prompts_and_generations_get_413(http: httpx.Client) -> None:
    long_prompt = "tick " * (API_MAX_PROMPT_TOKENS * 2)
    message = _error(
        http.post("/v1/generate", json={"prompt": long_prompt}), 413, "prompt_too_long"
    )
    assert f"the limit is {API_MAX_PROMPT_TOKENS}" in message
    many = {"prompt": "hi", "max_new_tokens": API_MAX_NEW_TOKENS + 1}
    _error(http.post("/v1/generate", json=many), 413, "prompt_too_long")


# --- keys, limits, sizes --------------------------------------------------------------------


def test_keys_and_roles(api_server: ApiServer) -> None:
    url = api_server.url
    r = httpx.get(url + "/v1/positions")
    _error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"].startswith("ApiKey")
    _error(httpx.get(url + "/v1/positions", headers={"X-API-Key": "rf_wrong"}), 401, "unauthorized")
    bearer = {"Authorization": f"Bearer {api_server.read_key}"}
    assert httpx.get(url + "/v1/positions", headers=bearer).status_code == 200
    trade = {"X-API-Key": api_server.trade_key}
    assert httpx.get(url + "/v1/positions", headers=trade).status_code == 200


def test_a_key_over_its_rate_gets_429_then_recovers(api_server: ApiServer) -> None:
    headers = {"X-API-Key": api_server.slow_key}
    with httpx.Client(base_url=api_server.url, headers=headers, timeout=30) as slow:
        statuses = [slow.get("/v1/positions").status_code for _ in range(4)]
        assert statuses[:2] == [200, 200]
        assert 429 in statuses[2:]
        refused = slow.get("/v1/positions")
        assert refused.status_code == 429
        wait = float(refused.headers["retry-after"])
        assert 0 < wait <= 2
        time.sleep(wait + 0.1)
        assert slow.get("/v1/positions").status_code == 200


def test_oversized_bodies_get_413(api_server: ApiServer, http: httpx.Client) -> None:
    big = {"symbol": "ES", "price": 1.0, "features": {"pad": 1.0}, "x": "y" * 70_000}
    _error(http.post("/v1/score", json=big), 413, "too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused as the bytes pass the limit
        yield b'{"headlines": ["'
        for _ in range(100):
            yield b"z" * 1024
        yield b'"]}'

    r = http.post("/v1/sentiment", content=chunks(), headers={"content-type": "application/json"})
    _error(r, 413, "too_large")


def test_unknown_query_parameters_and_tiny_temperatures_get_422(http: httpx.Client) -> None:
    message = _error(http.get("/v1/decisions", params={"ordr": "desc"}), 422, "validation_error")
    assert "'ordr'" in message
    assert "order" in message
    tiny = {"prompt": "hi", "temperature": 1e-300}
    assert "temperature" in _error(http.post("/v1/generate", json=tiny), 422, "validation_error")
