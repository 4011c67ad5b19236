"""The Python SDK against the real API (``api_server``): every client method, its typed
answers checked against the parts behind the API (the registry's models, the ledger),
error mapping, retries, and the research workflow through to a deployed model."""

from __future__ import annotations

import datetime as dt
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from api_fixtures import API_MAX_NEW_TOKENS, ApiServer
from market_fixtures import ACTIVE_CONFIG
from pydantic import ValidationError

import rayfin
from rayfin.errors import ApiConnectionError, ApiRequestError
from rayfin.sdk import RayfinClient, frame_rows, research
from rayfin.serve import schemas as s
from rayfin.stream.broker import free_port
from rayfin.trading import ModelRegistry, SearchSpace
from rayfin.trading.inputs import PRICE, required_columns
from rayfin.trading.ledger import Ledger

pytestmark = [pytest.mark.integration, pytest.mark.model]


@pytest.fixture
def client(api_server: ApiServer) -> Iterator[RayfinClient]:
    with rayfin.connect(api_server.url, api_server.read_key) as c:
        yield c


@pytest.fixture
def trader(api_server: ApiServer) -> Iterator[RayfinClient]:
    with rayfin.connect(api_server.url, api_server.trade_key) as c:
        yield c


def _statuses(c: RayfinClient) -> list[int]:
    """Records the status of every HTTP answer ``c`` gets from now on."""
    seen: list[int] = []
    c.http.event_hooks["response"].append(lambda r: seen.append(r.status_code))
    return seen


def _plain(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts of Python values, NaN and NA as None, for exact comparison."""
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    return [
        {k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()} for row in rows
    ]


def _served(api: ApiServer, ref: s.ModelRef) -> Any:
    """The model a score names, from the API's own registry (a test may promote another)."""
    return ModelRegistry(api.registry).load(ref.name, ref.version)


def _needed(model: Any) -> list[str]:
    """The feature columns ``model`` reads, besides the price."""
    return sorted({c for f in model.features for c in required_columns(f)} - {PRICE})


def _warming(frame: pd.DataFrame, model: Any) -> pd.Index:
    """Rows where a column ``model`` reads is NaN: a window not warm yet, or a statistic
    of a one-tick bar. The model takes NaN as missing; the API takes null for it."""
    return frame.index[frame[_needed(model)].isna().any(axis=1)]


# -- connecting ------------------------------------------------------------------------------


def test_import_rayfin_stays_light() -> None:
    code = (
        "import sys, rayfin\n"
        "assert 'httpx' not in sys.modules and 'rayfin.sdk' not in sys.modules\n"
        "from rayfin.sdk import connect\n"
        "assert rayfin.connect is connect\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_connect_closes_its_http_client(api_server: ApiServer) -> None:
    with rayfin.connect(api_server.url + "/", api_server.read_key, timeout=5) as c:
        assert isinstance(c, RayfinClient)
        assert c.url == api_server.url
        assert c.health().status == "ok"
    assert c.http.is_closed


def test_unreachable_api_raises_after_retrying_gets() -> None:
    with rayfin.connect(f"http://127.0.0.1:{free_port()}", "rf_x", max_retries=2) as c:
        seen: list[str] = []
        c.http.event_hooks["request"].append(lambda r: seen.append(r.method))
        with pytest.raises(ApiConnectionError, match="no answer"):
            c.positions()
        assert seen == ["GET"] * 3  # the first try and two retries
        seen.clear()
        with pytest.raises(ApiConnectionError):
            c.sentiment(["Acme beats estimates"])
        assert seen == ["POST"]  # a POST is never resent after a broken connection


# -- operations ------------------------------------------------------------------------------


def test_health_needs_no_key_and_pipeline_needs_one(api_server: ApiServer) -> None:
    with rayfin.connect(api_server.url, None) as anonymous:
        health = anonymous.health()
        assert isinstance(health, s.Health)
        assert health.version == rayfin.__version__
        assert {name: c.status for name, c in health.components.items()} == {
            "ledger": "ok",
            "model": "ok",
            "llm": "ok",
        }
        with pytest.raises(ApiRequestError) as refused:
            anonymous.pipeline()
        assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    with rayfin.connect(api_server.url, api_server.read_key) as c:
        stats = c.pipeline()
        assert isinstance(stats, s.PipelineStats)
        assert stats.consumers == 0  # no live consumers in this session's API
        assert stats.dead_letters == 0


def test_metrics_is_prometheus_text(client: RayfinClient) -> None:
    client.positions()  # at least one counted request
    deadline = time.monotonic() + 20  # Ray exports metrics every second here
    while True:
        text = client.metrics()
        if "rayfin_serve_requests" in text or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert "ray_rayfin_serve_requests" in text
    assert all(
        line.startswith(("#", "ray_rayfin_", "ray_serve_")) for line in text.splitlines() if line
    )


# -- scoring ---------------------------------------------------------------------------------


def test_score_equals_the_served_model(api_server: ApiServer, client: RayfinClient) -> None:
    frame = api_server.features
    for at in (len(frame) - 1, frame.index.get_loc(_warming(frame, api_server.model)[-1])):
        row = frame.iloc[at]
        result = client.score(
            row["symbol"],
            float(row[PRICE]),
            {name: float(row[name]) for name in _needed(api_server.model)},  # NaN included
            ts=dt.datetime.fromtimestamp(row["ts"] / 1e9, tz=dt.UTC),
            position=1,
        )
        assert isinstance(result, s.ScoreResult)
        assert result.symbol == row["symbol"]
        assert result.model.name == "market"
        expected = _served(api_server, result.model).predict_proba(frame.iloc[[at]])[0]
        got = result.probabilities
        np.testing.assert_allclose([got.down, got.flat, got.up], expected, rtol=0, atol=1e-9)
        assert result.decision.threshold == ACTIVE_CONFIG.strategy.threshold
        if result.decision.action == "hold":
            assert result.decision.quantity == 0
            assert result.decision.reason
        else:
            assert result.decision.quantity > 0
            assert result.decision.purpose


def test_score_sentiment_reaches_the_model(api_server: ApiServer, client: RayfinClient) -> None:
    frame = api_server.features.iloc[[-10]]
    row = frame_rows(frame)[0]
    result = client.score(row.symbol, row.price, row.features, sentiment=0.8)
    expected = _served(api_server, result.model).predict_proba(frame, sentiment=0.8)[0]
    got = result.probabilities
    np.testing.assert_allclose([got.down, got.flat, got.up], expected, rtol=0, atol=1e-9)


def test_score_errors(client: RayfinClient) -> None:
    with pytest.raises(ApiRequestError) as missing:
        client.score("ES", 1640.25, {"ret_1": 0.0})
    error = missing.value
    assert (error.status, error.code) == (422, "missing_features")
    assert "needs features the request lacks" in error.message
    assert "vol_20t" in error.message
    assert error.retry_after is None
    # Checked against the shared schema before anything is sent.
    seen = _statuses(client)
    with pytest.raises(ValidationError):
        client.score("ES", -1.0, {"ret_1": 0.0})
    with pytest.raises(ValidationError, match="finite"):
        client.score("ES", 1640.25, {"ret_1": math.inf})
    assert seen == []


def test_score_frame_cuts_batches_and_keeps_order(
    api_server: ApiServer, client: RayfinClient
) -> None:
    frame = api_server.features.iloc[-1_200:]
    warming = _warming(frame, api_server.model)
    assert len(warming) > 0  # some rows the model sees with missing values
    seen = _statuses(client)
    batch = client.score_frame(frame)
    assert isinstance(batch, s.ScoreBatchResult)
    assert len(batch.results) == len(frame)
    # 1,200 rows of ~1.3 kB are far over the 64 KiB body limit: many requests, none refused.
    assert len(seen) > 10
    assert set(seen) == {200}
    got = np.array(
        [[r.probabilities.down, r.probabilities.flat, r.probabilities.up] for r in batch.results]
    )
    versions = pd.Series([r.model.version for r in batch.results])
    for version, at in versions.groupby(versions).groups.items():
        model = _served(api_server, s.ModelRef(name="market", version=int(version)))
        expected = model.predict_proba(frame.iloc[list(at)])
        np.testing.assert_allclose(got[list(at)], expected, rtol=0, atol=1e-9)


def test_frame_rows_send_nan_as_null(api_server: ApiServer) -> None:
    frame = api_server.features.iloc[-400:]
    rows = frame_rows(frame, position=-2)
    assert [r.price for r in rows] == frame["price"].tolist()
    assert all(r.position == -2 and r.sentiment is None for r in rows)
    assert rows[0].ts == dt.datetime.fromtimestamp(frame["ts"].iloc[0] / 1e9, tz=dt.UTC)
    # The columns inputs are built from, not identity ones, and NaN as None.
    sent = set(rows[0].features)
    assert set(_needed(api_server.model)) <= sent
    assert not sent & {"offset", "seq", "partition", "late", "tumble_20t_id", "price"}
    at = frame.index.get_loc(_warming(frame, api_server.model)[0])
    for name, value in rows[at].features.items():
        expected = frame[name].iloc[at]
        assert value is None if np.isnan(expected) else value == expected
    assert None in rows[at].features.values()
    with_news = frame_rows(frame.iloc[:3].assign(sentiment=[0.5, np.nan, -0.25]))
    assert [r.sentiment for r in with_news] == [0.5, None, -0.25]
    assert "sentiment" not in with_news[0].features


def test_score_batch_learns_a_lower_body_limit(api_server: ApiServer, client: RayfinClient) -> None:
    rows = frame_rows(api_server.features.iloc[-1_100:-100])
    # Believing the server takes any size, the client sends MAX_SCORE_ROWS rows at once;
    # the 413 teaches it the real limit and it halves until the batches fit.
    client.max_body_bytes = 10**9
    seen = _statuses(client)
    batch = client.score_batch(rows)
    assert [r.symbol for r in batch.results] == [r.symbol for r in rows]
    assert seen[0] == 413
    assert seen[-1] == 200
    assert client.max_body_bytes <= 64 * 1024
    plain = client.score_batch(rows[:3])
    for a, b in zip(plain.results, batch.results[:3], strict=True):
        assert a.probabilities == b.probabilities


# -- ledger views ----------------------------------------------------------------------------


def test_decision_pages_chain_and_cover_every_row_once(
    api_server: ApiServer, client: RayfinClient
) -> None:
    with Ledger(api_server.ledger_url) as ledger:
        stored = ledger.decisions()
    assert len(stored) > 10, "the backtest recorded too few decisions to page"
    size = math.ceil(len(stored) / 4)
    pages, offset = [], 0
    while offset is not None:
        page = client.decisions(limit=size, offset=offset)
        assert isinstance(page, s.DecisionPage)
        assert (page.limit, page.offset) == (size, offset)
        pages.append(page)
        offset = page.next_offset
    assert len(pages) == 4
    assert all(len(p.items) == size for p in pages[:-1])
    assert 0 < len(pages[-1].items) <= size
    key = ["ts", "source_offset", "action", "order_id"]
    served = [[getattr(r, k) for k in key] for p in pages for r in p.items]
    assert served == [list(r.values()) for r in _plain(stored[key])]
    # Newest first is the exact reverse; iter_decisions follows next_offset itself.
    newest = [
        [getattr(r, k) for k in key] for r in client.iter_decisions(order="desc", page_size=size)
    ]
    assert newest == served[::-1]


def test_decisions_filter_by_symbol_and_time(api_server: ApiServer, client: RayfinClient) -> None:
    with Ledger(api_server.ledger_url) as ledger:
        everything = ledger.decisions()
        ts = everything["ts"].to_numpy()
        start = dt.datetime.fromtimestamp(ts[len(ts) // 4] / 1e9, tz=dt.UTC)
        end = dt.datetime.fromtimestamp(ts[len(ts) // 2] / 1e9, tz=dt.UTC)
        expected = ledger.decisions("ES", start, end)
    served = client.decisions_frame("ES", start, end)
    assert 0 < len(served) < len(everything)
    assert served["ts"].tolist() == expected["ts"].tolist()
    assert client.decisions_frame("NQ").empty
    with pytest.raises(ApiRequestError) as naive:
        client.decisions(start=dt.datetime(2013, 9, 3, 9, 30))
    assert (naive.value.status, naive.value.code) == (422, "validation_error")
    assert "timezone" in naive.value.message
    with pytest.raises(ApiRequestError) as too_many:
        client.decisions(limit=s.MAX_PAGE + 1)
    assert too_many.value.code == "validation_error"
    assert too_many.value.detail[0]["loc"] == ["query", "limit"]


def test_decisions_frame_equals_the_ledger(api_server: ApiServer, client: RayfinClient) -> None:
    with Ledger(api_server.ledger_url) as ledger:
        stored = ledger.decisions()
    frame = client.decisions_frame()
    assert list(frame.columns) == list(s.DecisionRow.model_fields)
    assert set(stored.columns) <= set(frame.columns)
    assert _plain(frame[list(stored.columns)]) == _plain(stored)
    drift = pd.to_datetime(frame["time"], utc=True) - pd.to_datetime(
        frame["ts"], unit="ns", utc=True
    )
    assert (drift.abs() <= pd.Timedelta(microseconds=1)).all()


def test_orders_pages_and_frame_equal_the_ledger(
    api_server: ApiServer, client: RayfinClient
) -> None:
    with Ledger(api_server.ledger_url) as ledger:
        stored = ledger.orders()
    assert len(stored) > 2, "the backtest sent too few orders to page"
    ids = [o.id for o in client.iter_orders(page_size=2)]
    assert ids == stored["id"].tolist()
    page = client.orders(limit=2, offset=0, order="desc")
    assert [o.id for o in page.items] == ids[::-1][:2]
    assert page.next_offset == 2
    frame = client.orders_frame()
    assert _plain(frame[list(stored.columns)]) == _plain(stored)


def test_positions_and_pnl_equal_the_ledger(api_server: ApiServer, client: RayfinClient) -> None:
    with Ledger(api_server.ledger_url) as ledger:
        stored = ledger.positions()
        marks = {
            r.symbol: float(r.last_price) for r in stored.itertuples() if not pd.isna(r.last_price)
        }
        expected = ledger.pnl(marks, ts=int(stored["ts"].max()))
    positions = client.positions()
    assert isinstance(positions, s.Positions)
    assert [
        (p.symbol, p.quantity, p.avg_price, p.realized_pnl, p.fees) for p in positions.items
    ] == [(r.symbol, r.quantity, r.avg_price, r.realized_pnl, r.fees) for r in stored.itertuples()]
    pnl = client.pnl(points=50)
    summary = expected.summary
    for field in ("realized_pnl", "unrealized_pnl", "fees", "equity", "peak_equity", "drawdown"):
        assert getattr(pnl, field) == pytest.approx(getattr(summary, field), rel=1e-12, abs=1e-9)
    curve = expected.equity_curve
    assert 2 <= len(pnl.equity_curve) <= 50
    assert pnl.equity_curve[0].ts == curve["ts"].iloc[0]
    assert pnl.equity_curve[-1].ts == curve["ts"].iloc[-1]
    assert pnl.equity_curve[-1].equity == pytest.approx(curve["equity"].iloc[-1], rel=1e-12)
    assert set(p.equity for p in pnl.equity_curve) <= set(curve["equity"])
    assert len(client.pnl(points=5000).equity_curve) == min(5000, len(curve))


# -- models ----------------------------------------------------------------------------------


def test_models_lists_the_registry(api_server: ApiServer, client: RayfinClient) -> None:
    listing = client.models()
    assert isinstance(listing, s.ModelList)
    registry = ModelRegistry(api_server.registry)
    assert listing.name == "market"
    assert [v.version for v in listing.versions] == [v.version for v in registry.versions("market")]
    assert listing.production == registry.get("market", "production").version
    current = next(v for v in listing.versions if v.version == listing.production)
    assert "production" in current.aliases
    with pytest.raises(ApiRequestError) as unknown:
        client.models("no-such-model")
    assert (unknown.value.status, unknown.value.code) == (404, "not_found")


def test_keys_and_roles_map_to_errors(api_server: ApiServer, trader: RayfinClient) -> None:
    production = trader.models().production
    assert production is not None
    with rayfin.connect(api_server.url, api_server.read_key) as reader:
        with pytest.raises(ApiRequestError) as forbidden:
            reader.promote(production)
        assert (forbidden.value.status, forbidden.value.code) == (403, "forbidden")
        assert "trade" in forbidden.value.message
    with rayfin.connect(api_server.url, "rf_not-a-key") as stranger:
        with pytest.raises(ApiRequestError) as unauthorized:
            stranger.positions()
        assert (unauthorized.value.status, unauthorized.value.code) == (401, "unauthorized")
        assert "X-API-Key" in str(unauthorized.value)
    with pytest.raises(ApiRequestError) as missing:
        trader.promote(10**6)
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    # Promoting what is already production changes nothing served.
    again = trader.promote(production)
    assert isinstance(again, s.ModelVersionOut)
    assert again.version == production
    assert "production" in again.aliases


def test_upload_rejects_a_model_that_does_not_load(
    api_server: ApiServer, trader: RayfinClient
) -> None:
    version = api_server.model.version
    before = [v.version for v in trader.models().versions]
    with pytest.raises(ApiRequestError) as bad:
        trader.upload_model(
            "tree\nnot a model",
            features=version.features,
            label_spec=version.label_spec,
            fingerprint=version.fingerprint,
        )
    assert (bad.value.status, bad.value.code) == (422, "bad_model")
    assert [v.version for v in trader.models().versions] == before


def test_slow_key_is_retried_after_429(api_server: ApiServer) -> None:
    with rayfin.connect(api_server.url, api_server.slow_key, max_retries=0) as impatient:
        error = None
        for _ in range(6):  # burst 2 at 1 request/s: the third in a row is refused
            try:
                impatient.positions()
            except ApiRequestError as exc:
                error = exc
                break
    assert error is not None, "six requests in a row were all admitted"
    assert (error.status, error.code) == (429, "rate_limited")
    assert error.retry_after is not None
    assert error.retry_after >= 1
    with rayfin.connect(api_server.url, api_server.slow_key, max_retries=3) as patient:
        seen = _statuses(patient)
        started = time.monotonic()
        for _ in range(4):
            assert isinstance(patient.positions(), s.Positions)
        assert 429 in seen
        assert seen.count(200) == 4
        assert time.monotonic() - started >= 1.0  # it waited as Retry-After said


# -- LLM -------------------------------------------------------------------------------------


def test_sentiment_scores_each_headline(client: RayfinClient) -> None:
    headlines = ["Acme beats estimates and raises guidance", "Acme recalls its flagship car"]
    result = client.sentiment(headlines)
    assert isinstance(result, s.SentimentResult)
    assert "smollm2" in result.scorer
    assert [r.headline for r in result.scores] == headlines
    for r in result.scores:
        assert r.negative + r.neutral + r.positive == pytest.approx(1.0, abs=1e-5)
        assert r.sentiment == pytest.approx(r.positive - r.negative, abs=1e-6)
    one = client.sentiment(headlines[0])  # a lone string is one headline
    assert [r.headline for r in one.scores] == headlines[:1]
    assert one.scores[0].sentiment == pytest.approx(result.scores[0].sentiment, abs=1e-3)


def test_generate_is_greedy_and_limited(client: RayfinClient) -> None:
    first = client.generate("What is a futures contract?", max_new_tokens=4)
    assert isinstance(first, s.GenerateResult)
    assert first.text.strip()
    assert 1 <= first.new_tokens <= 4
    assert first.prompt_tokens > 5
    assert client.generate("What is a futures contract?", max_new_tokens=4).text == first.text
    # Left out, the length is the server's limit (8 here); above it, a 413.
    counted = client.generate("Count from one to fifty, in words.")
    assert counted.new_tokens == API_MAX_NEW_TOKENS
    assert counted.finish_reason == "length"
    with pytest.raises(ApiRequestError) as too_long:
        client.generate("Count from one to fifty.", max_new_tokens=API_MAX_NEW_TOKENS + 1)
    assert (too_long.value.status, too_long.value.code) == (413, "prompt_too_long")
    assert f"the limit is {API_MAX_NEW_TOKENS}" in too_long.value.message
    with pytest.raises(ValidationError, match="max_tokens"):
        client.generate("hi", max_tokens=4)  # a misspelt option is an error, not ignored


# -- the research workflow -------------------------------------------------------------------


def test_load_history_slices_the_es_ticks() -> None:
    from rayfin.datasets import es_ticks

    head = es_ticks(1_000)
    part = research.load_history(slice(100, 1_000))
    assert len(part) == 900
    assert part.index[0] == 0
    pd.testing.assert_frame_equal(part, head.iloc[100:].reset_index(drop=True))
    tail = research.load_history(slice(-5, None))
    assert len(tail) == 5
    assert tail["timestamp"].is_monotonic_increasing


def test_research_workflow_deploys_a_new_model(
    api_server: ApiServer, trader: RayfinClient, tmp_path: Path
) -> None:
    from rayfin.features import online_features

    ticks = research.load_history(slice(30_000, 38_000))
    features = research.compute_features(ticks)
    pd.testing.assert_frame_equal(features, online_features(ticks))
    registry = tmp_path / "models"
    version = research.train(
        features.iloc[:6_000],
        registry=registry,
        search=SearchSpace(grid={"num_leaves": (7,)}),
        max_rounds=30,
        seed=11,
    )
    result = research.backtest(features.iloc[6_000:], registry=registry, version=version)
    assert result.metrics["fills"] >= 0
    assert sum(result.outcomes.values()) > 0

    before = trader.models()
    try:
        out = trader.deploy_model(registry, version)
        assert isinstance(out, s.ModelVersionOut)
        assert out.version == max(v.version for v in before.versions) + 1
        assert "production" in out.aliases
        assert out.features == list(version.features)
        assert trader.models().production == out.version
        # The server holds the same model text, metadata and drift reference.
        served = ModelRegistry(api_server.registry)
        assert served.get("market", out.version).fingerprint == version.fingerprint
        assert served.reference("market", out.version) == ModelRegistry(registry).reference(
            "market", version.version
        )
        row = frame_rows(features.iloc[[-1]])[0]
        score = trader.score(row.symbol, row.price, row.features)
        assert score.model.version == out.version
        local = ModelRegistry(registry).load("market", version.version)
        expected = local.predict_proba(features.iloc[[-1]])[0]
        got = score.probabilities
        np.testing.assert_allclose([got.down, got.flat, got.up], expected, rtol=0, atol=1e-9)
        # Uploaded without promoting: registered, not served.
        parked = research.deploy(trader, registry, version.version, promote=False)
        assert parked.version == out.version + 1
        assert parked.aliases == []
        assert trader.models().production == out.version
    finally:
        # Leave production as the other tests found it.
        assert before.production is not None
        trader.promote(before.production)
