"""The HTTP API's bodies: one pydantic model per request and response, shared by the
server (validation, the OpenAPI spec and its examples) and the Python SDK (typed results).

Times go out twice, as ``ts`` (integer nanoseconds since the epoch, UTC, the ledger's own
clock) and ``time`` (ISO 8601, UTC), and come in as timezone-aware ISO 8601 datetimes.
Every error is an :class:`ErrorBody`.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

API_VERSION = "v1"
MAX_PAGE = 1000
"""Most rows one page of decisions or orders returns."""
MAX_SCORE_ROWS = 1000
"""Most rows one batch score request takes."""
MAX_HEADLINES = 64
MAX_HEADLINE_CHARS = 512
DEFAULT_NEW_TOKENS = 64
MIN_TEMPERATURE = 0.01
MAX_FEATURES = 256
"""Most feature columns one row may carry (a model uses a few dozen)."""

Symbol = Annotated[
    str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9._:/-]+$", examples=["ES"])
]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


EARLIEST = dt.datetime(1678, 1, 1, tzinfo=dt.UTC)
LATEST = dt.datetime(2262, 1, 1, tzinfo=dt.UTC)
"""Event times are int64 nanoseconds since the epoch: this is the span they can hold."""


def check_event_time(value: dt.datetime, what: str) -> dt.datetime:
    """``value`` if the ledger's int64-nanosecond clock can hold it, else a ValueError."""
    if not EARLIEST <= value < LATEST:
        raise ValueError(f"{what} must be between {EARLIEST:%Y} and {LATEST:%Y}")
    return value


def iso_text(value: object) -> object:
    """A date-time given as ISO 8601 text, not as a number of seconds, which pydantic would
    otherwise read as a Unix time (and "0.5" looks like one too)."""
    if value is None or isinstance(value, dt.datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("give the time as ISO 8601 text, e.g. 2013-09-03T14:30:00Z")
    try:
        float(value)
    except ValueError:
        return value
    raise ValueError("give the time as ISO 8601 text, e.g. 2013-09-03T14:30:00Z")


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number")
    return value


class _Body(BaseModel):
    # Unknown fields are errors: a misspelt option must not be silently ignored. Strict:
    # false is not a position and "1" is not a price (JSON's ints still pass as floats).
    model_config = ConfigDict(extra="forbid", strict=True)


class _Out(BaseModel):
    # The SDK reads responses of newer servers, which may carry fields it does not know.
    model_config = ConfigDict(extra="ignore")


# --- errors ---------------------------------------------------------------------------------


class ErrorDetail(_Out):
    """What went wrong: a stable ``code`` to branch on and a ``message`` for people."""

    code: str = Field(examples=["validation_error"])
    message: str = Field(examples=["body.features: field required"])
    detail: Any = None


class ErrorBody(_Out):
    """Every error response."""

    error: ErrorDetail


# --- scoring --------------------------------------------------------------------------------


_ES_FEATURES = {
    "count_10s": 10.0, "count_60s": 16.0, "ema_100t": 1640.834915, "ema_20t": 1640.89957,
    "ret_1": 0.0, "ret_100": 0.000152, "ret_20": 0.000152, "rsi_14": 71.862998, "size": 2.0,
    "sma_100t": 1640.78, "sma_10s": 1641.0, "sma_20t": 1640.85, "sma_60s": 1640.890625,
    "tumble_100t_count": 100.0, "tumble_100t_sma": 1640.78, "tumble_100t_vol": 5.5e-05,
    "tumble_100t_volume": 419.0, "tumble_100t_vwap": 1640.765513, "tumble_10s_count": 10.0,
    "tumble_10s_sma": 1641.0, "tumble_10s_vol": 4.8e-05, "tumble_10s_volume": 13.0,
    "tumble_10s_vwap": 1641.0, "tumble_20t_count": 20.0, "tumble_20t_sma": 1640.85,
    "tumble_20t_vol": 6e-05, "tumble_20t_volume": 59.0, "tumble_20t_vwap": 1640.79661,
    "tumble_60s_count": 16.0, "tumble_60s_sma": 1640.890625, "tumble_60s_vol": 5.2e-05,
    "tumble_60s_volume": 53.0, "tumble_60s_vwap": 1640.806604, "vol_100t": 5.5e-05,
    "vol_10s": 4.8e-05, "vol_20t": 6e-05, "vol_60s": 5.2e-05, "volume_100t": 419.0,
    "volume_10s": 13.0, "volume_20t": 59.0, "volume_60s": 53.0, "vwap_100t": 1640.765513,
    "vwap_10s": 1641.0, "vwap_20t": 1640.79661, "vwap_60s": 1640.806604,
}  # fmt: skip
"""The engine's features of the 5,000th bundled ES tick (2013-09-02 00:17:57 UTC)."""


class ScoreRow(_Body):
    """One tick's engine features, as the live pipeline computes them."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "symbol": "ES",
                    "price": 1641.0,
                    "ts": "2013-09-02T00:17:57.413Z",
                    "features": _ES_FEATURES,
                    "sentiment": 0.2,
                    "position": 0,
                }
            ]
        },
    )

    symbol: Symbol
    price: float = Field(gt=0, description="the tick's trade price", examples=[1640.25])
    ts: AwareDatetime | None = Field(
        None,
        strict=False,  # ISO 8601 text is how JSON carries a time
        description="the tick's event time; default now",
        examples=["2013-09-03T14:30:00Z"],
    )
    features: dict[Annotated[str, Field(max_length=64)], float | None] = Field(
        max_length=MAX_FEATURES,
        description="feature columns by name (rayfin.features.spec); null where a window is "
        "not warm yet (the model treats it as missing); absent ones the model needs are "
        "reported by name",
        examples=[{"sma_20": 1640.1, "ret_1": 0.0002, "vol_100": 0.0004}],
    )
    sentiment: float | None = Field(
        None, ge=-1.0, le=1.0, description="news sentiment in [-1, 1]; neutral if omitted"
    )
    position: int = Field(
        0,
        ge=-1_000_000,
        le=1_000_000,
        description="signed position, in contracts, the decision assumes (pending orders included)",
    )

    @field_validator("price")
    @classmethod
    def _price(cls, value: float) -> float:
        return _finite(value, "price")

    _ts_text = field_validator("ts", mode="before")(iso_text)

    @field_validator("ts")
    @classmethod
    def _ts(cls, value: dt.datetime | None) -> dt.datetime | None:
        return None if value is None else check_event_time(value, "ts")

    @field_validator("features")
    @classmethod
    def _features(cls, values: dict[str, float | None]) -> dict[str, float | None]:
        for name, value in values.items():
            if value is not None:
                _finite(value, f"features.{name}")
        return values


class ScoreBatch(_Body):
    """Many rows scored in one call (one model pass)."""

    rows: list[ScoreRow] = Field(min_length=1, max_length=MAX_SCORE_ROWS)


class ModelRef(_Out):
    name: str = Field(examples=["market"])
    version: int = Field(examples=[3])


class Probabilities(_Out):
    down: Probability
    flat: Probability
    up: Probability


class DecisionOut(_Out):
    """What the threshold strategy does with the signal: an order, or why it holds. Risk
    limits apply in the live trader, which knows the whole portfolio."""

    action: Literal["buy", "sell", "hold"]
    quantity: int = Field(0, ge=0, description="contracts to trade; 0 when holding")
    purpose: str | None = Field(None, examples=["entry"])
    reason: str | None = Field(None, description="why it holds", examples=["below_threshold"])
    threshold: float = Field(examples=[0.7])


class ScoreResult(_Out):
    symbol: str
    model: ModelRef
    probabilities: Probabilities
    decision: DecisionOut


class ScoreBatchResult(_Out):
    model: ModelRef
    results: list[ScoreResult]


# --- ledger views ---------------------------------------------------------------------------


class Page(_Out):
    limit: int
    offset: int
    next_offset: int | None = Field(description="offset of the next page; null on the last")


class DecisionRow(_Out):
    ts: int
    time: dt.datetime
    symbol: str
    price: float
    p_down: float
    p_flat: float
    p_up: float
    action: str
    accepted: bool
    reason: str
    risk_state: str
    order_id: str | None = None
    side: int | None = None
    quantity: int | None = None
    purpose: str | None = None
    sentiment: float | None = None
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None


class DecisionPage(Page):
    items: list[DecisionRow]


class OrderRow(_Out):
    id: str
    ts: int
    time: dt.datetime
    symbol: str
    side: int
    quantity: int
    purpose: str
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None


class OrderPage(Page):
    items: list[OrderRow]


class PositionRow(_Out):
    symbol: str
    quantity: int
    avg_price: float
    realized_pnl: float
    fees: float
    last_price: float | None
    unrealized_pnl: float
    ts: int
    time: dt.datetime


class Positions(_Out):
    items: list[PositionRow]


class EquityPoint(_Out):
    ts: int
    time: dt.datetime
    equity: float


class PnL(_Out):
    """Account P&L recomputed from the ledger's fills, open positions at their last price."""

    realized_pnl: float
    unrealized_pnl: float
    fees: float
    equity: float
    peak_equity: float
    drawdown: float = Field(description="fraction of peak equity")
    open_positions: int
    equity_curve: list[EquityPoint] = Field(description="at most `points` samples, evenly spaced")


# --- models ---------------------------------------------------------------------------------


class ModelVersionOut(_Out):
    name: str
    version: int
    created: str
    features: list[str]
    metrics: dict[str, Any]
    aliases: list[str] = Field(description="aliases pointing at this version now")


class ModelList(_Out):
    name: str
    production: int | None = Field(description="the version /v1/score uses")
    versions: list[ModelVersionOut]


class ModelUpload(_Body):
    """A LightGBM model trained elsewhere (the SDK's ``deploy``), registered as the next
    version; it serves once promoted."""

    name: str = Field("market", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    model_text: str = Field(min_length=1, description="LightGBM model text")
    features: list[Annotated[str, Field(max_length=64)]] = Field(
        min_length=1, max_length=MAX_FEATURES
    )
    label_spec: dict[str, Any] = Field(description="rayfin.trading.LabelSpec.to_dict()")
    fingerprint: str = Field(min_length=1, max_length=128)
    params: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    reference: dict[str, Any] | None = Field(
        None, description="drift reference (rayfin.trading.monitoring.DriftReference.to_dict)"
    )


# --- LLM ------------------------------------------------------------------------------------


class SentimentRequest(_Body):
    headlines: list[Annotated[str, Field(min_length=1, max_length=MAX_HEADLINE_CHARS)]] = Field(
        min_length=1,
        max_length=MAX_HEADLINES,
        examples=[["Acme beats estimates and raises guidance", "Acme recalls its flagship"]],
    )


class SentimentScore(_Out):
    headline: str
    negative: Probability
    neutral: Probability
    positive: Probability
    sentiment: float = Field(ge=-1.0, le=1.0, description="P(positive) - P(negative)")


class SentimentResult(_Out):
    scorer: str = Field(examples=["smollm2-135m zero-shot"])
    scores: list[SentimentScore]


class GenerateRequest(_Body):
    prompt: str = Field(
        min_length=1, max_length=64 * 1024, examples=["What is a futures contract?"]
    )
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        le=4096,
        description=f"tokens to generate at most; default {DEFAULT_NEW_TOKENS} or the server's "
        "limit if lower (more than the limit: 413)",
    )
    chat: bool = Field(True, description="wrap the prompt in the model's chat template")
    temperature: float = Field(
        0.0, ge=0.0, le=2.0, description=f"0: greedy; else at least {MIN_TEMPERATURE}"
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        # Logits divided by a tiny temperature overflow to inf, and sampling from inf fails.
        if 0.0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value


class GenerateResult(_Out):
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    tokens_per_s: float
    finish_reason: Literal["stop", "length"]


# --- operations -----------------------------------------------------------------------------


class ComponentHealth(_Out):
    status: Literal["ok", "degraded", "absent", "down"]
    detail: str = ""


class Health(_Out):
    status: Literal["ok", "degraded"]
    version: str
    components: dict[str, ComponentHealth]


class PipelineStats(_Out):
    """The live pipeline as its actors report it (empty when none runs)."""

    consumers: int
    records_in: int
    feature_rows: int
    dead_letters: int
    latency_ms: dict[str, float]
    records_per_second: float = Field(description="over each consumer's last second or so")
    lag: int
    trader: dict[str, Any] | None
    llm: dict[str, Any] | None
