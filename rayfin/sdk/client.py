"""The typed HTTP client of the rayfin API (:mod:`rayfin.serve`), one method per endpoint.

Every body is the pydantic model of :mod:`rayfin.serve.schemas`, the one the server
validates with: requests are checked here before they are sent (a bad field raises
pydantic's ``ValidationError``, a ``ValueError``), answers come back typed. Any non-2xx
answer raises :class:`~rayfin.errors.ApiRequestError` with the server's ``code`` and
``message``. 429 and 503 answers are retried after the ``Retry-After`` the server sends,
and connection failures of GET requests (idempotent) after a short backoff, up to
``max_retries`` times.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import operator
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

import httpx
from pydantic import BaseModel

from rayfin import __version__
from rayfin.config import ServeSettings
from rayfin.errors import ApiConnectionError, ApiRequestError
from rayfin.serve.auth import KEY_HEADER
from rayfin.serve.schemas import (
    MAX_PAGE,
    MAX_SCORE_ROWS,
    DecisionPage,
    DecisionRow,
    ErrorBody,
    GenerateRequest,
    GenerateResult,
    Health,
    ModelList,
    ModelUpload,
    ModelVersionOut,
    OrderPage,
    OrderRow,
    PipelineStats,
    PnL,
    Positions,
    ScoreBatchResult,
    ScoreResult,
    ScoreRow,
    SentimentRequest,
    SentimentResult,
)

if TYPE_CHECKING:
    import pandas as pd

    from rayfin.trading.registry import ModelRegistry, ModelVersion

DEFAULT_TIMEOUT_S = 60.0
"""Seconds to wait for an answer; LLM generation on CPUs takes seconds."""
DEFAULT_MAX_RETRIES = 2
DEFAULT_MAX_BODY_BYTES: int = ServeSettings.model_fields["max_body_bytes"].default
"""The server's default body limit; batches are cut to fit it (and halved on a 413)."""
RETRY_STATUSES = frozenset({429, 503})
_BACKOFF_S = 0.5  # first wait after a failure without Retry-After; doubles each time

Out = TypeVar("Out", bound=BaseModel)
Order = Literal["asc", "desc"]
Time = dt.datetime | str | None


def _retry_after(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds (it may be a number or an HTTP date)."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


def _error(response: httpx.Response) -> ApiRequestError:
    """The error an answer carries: the server's error body, or (from a proxy, say)
    whatever text came back."""
    retry = _retry_after(response) if response.status_code in RETRY_STATUSES else None
    try:
        error = ErrorBody.model_validate_json(response.content).error
    except ValueError:
        text = response.text.strip()[:300] or response.reason_phrase
        return ApiRequestError(
            response.status_code, f"http_{response.status_code}", text, None, retry
        )
    return ApiRequestError(response.status_code, error.code, error.message, error.detail, retry)


def _time(value: Time) -> str | None:
    # The server wants aware times and says so (422) for naive ones: no guessing here.
    return value.isoformat() if isinstance(value, dt.datetime) else value


def _page_params(
    symbol: str | None, start: Time, end: Time, limit: int, offset: int, order: Order
) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit, "offset": offset, "order": order}
    for key, value in (("symbol", symbol), ("start", _time(start)), ("end", _time(end))):
        if value is not None:
            params[key] = value
    return params


def _pages(
    fetch: Callable[..., DecisionPage | OrderPage],
    symbol: str | None,
    start: Time,
    end: Time,
    order: Order,
    page_size: int,
) -> Iterator[Any]:
    """The items of every page ``fetch`` returns, following ``next_offset``."""
    offset: int | None = 0
    while offset is not None:
        page = fetch(symbol, start, end, limit=page_size, offset=offset, order=order)
        yield from page.items
        offset = page.next_offset


def _missing_as_none(value: float | None) -> float | None:
    # JSON has no NaN; the API takes null for a missing value.
    return None if value is None or math.isnan(value) else float(value)


def _to_dict(value: Any) -> dict[str, Any] | None:
    """A rayfin object with ``to_dict`` (LabelSpec, DriftReference) or a mapping, as data."""
    if value is None:
        return None
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return dict(value)


def frame_rows(frame: pd.DataFrame, *, position: int = 0) -> list[ScoreRow]:
    """Engine feature rows (as :func:`rayfin.features.online_features` makes them) as
    :class:`ScoreRow` bodies.

    Each row sends the columns model inputs are built from (:mod:`rayfin.trading.inputs`),
    not the identity ones (``offset``, ``seq``, bar ids...). A value the engine left NaN
    (a window not warm yet, the volatility of a one-tick bar) goes as null, which the
    model takes as missing, as it does NaN live: JSON has no NaN. A ``sentiment`` column
    becomes each row's ``sentiment``.
    """
    import numpy as np
    import pandas as pd

    from rayfin.features.sentiment import SENTIMENT
    from rayfin.trading.inputs import LEVEL_PREFIX, PRICE, is_input_name

    missing = [c for c in ("symbol", "ts", PRICE) if c not in frame.columns]
    if missing:
        raise ValueError(f"feature rows need columns {missing}; got {list(frame.columns)}")
    names = [
        str(c)
        for c in frame.columns
        if c not in (PRICE, SENTIMENT)
        and (is_input_name(str(c)) or is_input_name(LEVEL_PREFIX + str(c)))
        and pd.api.types.is_numeric_dtype(frame[c])
        and not pd.api.types.is_bool_dtype(frame[c])
    ]
    values = frame[names].to_numpy(dtype=np.float64)
    present = ~np.isnan(values)  # an infinity stays, for ScoreRow to refuse
    times = pd.DatetimeIndex(pd.to_datetime(frame["ts"], utc=True)).to_pydatetime()
    sentiment = (
        frame[SENTIMENT].to_numpy(dtype=np.float64)
        if SENTIMENT in frame.columns
        else np.full(len(frame), np.nan)
    )
    rows = []
    for i, (symbol, price) in enumerate(zip(frame["symbol"], frame[PRICE], strict=True)):
        ok = present[i]
        rows.append(
            ScoreRow(
                symbol=str(symbol),
                price=float(price),
                ts=times[i],
                features={
                    name: float(v) if f else None
                    for name, v, f in zip(names, values[i], ok, strict=True)
                },
                sentiment=None if math.isnan(sentiment[i]) else float(sentiment[i]),
                position=position,
            )
        )
    return rows


class RayfinClient:
    """A client of one rayfin API (see the module docstring); a context manager.

    ``url`` is the API's base URL (``http://host:8000``), ``api_key`` a read or trade key
    (``None`` reaches only :meth:`health` and :meth:`metrics`). ``http`` is the underlying
    :class:`httpx.Client`.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries!r}")
        headers = {"User-Agent": f"rayfin-sdk/{__version__}"}
        if api_key:
            headers[KEY_HEADER] = api_key
        self.url = url.rstrip("/")
        self.max_retries = max_retries
        self.max_body_bytes = max_body_bytes
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __repr__(self) -> str:
        return f"RayfinClient({self.url!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # -- transport -----------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: BaseModel | bytes | None = None,
    ) -> httpx.Response:
        """Send one request, retrying as the module docstring says; raise for non-2xx."""
        headers = {}
        content = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            # exclude_none: an omitted optional field takes the server's default (ts: now).
            content = body if isinstance(body, bytes) else body.model_dump_json(exclude_none=True)
        attempt = 0
        while True:
            try:
                response = self.http.request(
                    method, path, params=params, content=content, headers=headers
                )
            except httpx.TransportError as exc:
                # A POST may have been applied before the connection broke: only GETs
                # are safe to send twice.
                if method == "GET" and attempt < self.max_retries:
                    time.sleep(_BACKOFF_S * 2**attempt)
                    attempt += 1
                    continue
                raise ApiConnectionError(
                    f"no answer from {self.url} to {method} {path}: {exc!r}"
                ) from exc
            if response.is_success:
                return response
            # 429 and 503 are refusals before any work, so any method may be resent.
            if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                wait = _retry_after(response)
                time.sleep(_BACKOFF_S * 2**attempt if wait is None else wait)
                attempt += 1
                continue
            raise _error(response)

    def _get(self, path: str, out: type[Out], params: Mapping[str, Any] | None = None) -> Out:
        return out.model_validate_json(self._request("GET", path, params=params).content)

    def _post(
        self,
        path: str,
        out: type[Out],
        body: BaseModel | bytes | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Out:
        response = self._request("POST", path, body=body, params=params)
        return out.model_validate_json(response.content)

    # -- scoring -------------------------------------------------------------------------

    def score(
        self,
        symbol: str,
        price: float,
        features: Mapping[str, float | None],
        *,
        sentiment: float | None = None,
        position: int = 0,
        ts: dt.datetime | None = None,
    ) -> ScoreResult:
        """Probabilities and the strategy's decision for one tick's features
        (``POST /v1/score``); ``position`` is the signed position the decision assumes.
        A NaN or None feature is missing to the model (a window not warm yet)."""
        row = ScoreRow(
            symbol=symbol,
            price=price,
            ts=ts,
            features={name: _missing_as_none(v) for name, v in features.items()},
            sentiment=sentiment,
            position=operator.index(position),  # a numpy int too; the schema is strict
        )
        return self._post("/v1/score", ScoreResult, row)

    def score_batch(self, rows: Iterable[ScoreRow | Mapping[str, Any]]) -> ScoreBatchResult:
        """Score any number of rows (``POST /v1/score/batch``), in requests of at most
        :data:`~rayfin.serve.schemas.MAX_SCORE_ROWS` rows and ``max_body_bytes``; results
        keep the rows' order. ``model`` is the version that scored the first request
        (each result names its own, should a promotion land in between)."""
        encoded = [
            (r if isinstance(r, ScoreRow) else ScoreRow.model_validate(r)).model_dump_json(
                exclude_none=True
            )
            for r in rows
        ]
        if not encoded:
            raise ValueError("score_batch: no rows to score")
        batches: deque[list[str]] = deque(self._cut(encoded))
        parts: list[ScoreBatchResult] = []
        while batches:
            batch = batches.popleft()
            # The rows are ScoreRow JSON already: join them into the ScoreBatch body.
            body = ('{"rows":[' + ",".join(batch) + "]}").encode()
            try:
                parts.append(self._post("/v1/score/batch", ScoreBatchResult, body))
            except ApiRequestError as exc:
                if exc.status != 413 or len(batch) == 1:
                    raise
                # The server's limit is below the one assumed: learn it, cut again.
                self.max_body_bytes = len(body) // 2
                batches.extendleft(reversed(self._cut(batch)))
        results = [result for part in parts for result in part.results]
        return ScoreBatchResult(model=parts[0].model, results=results)

    def _cut(self, encoded: list[str]) -> list[list[str]]:
        """Rows in batches of at most MAX_SCORE_ROWS rows and max_body_bytes bytes."""
        budget = self.max_body_bytes - 64  # the envelope, with room to spare
        batches: list[list[str]] = []
        batch: list[str] = []
        size = 0
        for row in encoded:
            if batch and (len(batch) == MAX_SCORE_ROWS or size + len(row) + 1 > budget):
                batches.append(batch)
                batch, size = [], 0
            batch.append(row)
            size += len(row) + 1
        batches.append(batch)
        return batches

    def score_frame(self, frame: pd.DataFrame, *, position: int = 0) -> ScoreBatchResult:
        """Score engine feature rows (a frame as :func:`rayfin.features.online_features`
        returns); see :func:`frame_rows` for what each row sends."""
        return self.score_batch(frame_rows(frame, position=position))

    # -- ledger --------------------------------------------------------------------------

    def decisions(
        self,
        symbol: str | None = None,
        start: Time = None,
        end: Time = None,
        *,
        limit: int = 100,
        offset: int = 0,
        order: Order = "asc",
    ) -> DecisionPage:
        """One page of recorded decisions with ``start <= time < end`` (aware datetimes
        or ISO 8601 strings); ``next_offset`` is the next page's ``offset``."""
        params = _page_params(symbol, start, end, limit, offset, order)
        return self._get("/v1/decisions", DecisionPage, params)

    def orders(
        self,
        symbol: str | None = None,
        start: Time = None,
        end: Time = None,
        *,
        limit: int = 100,
        offset: int = 0,
        order: Order = "asc",
    ) -> OrderPage:
        """One page of orders sent to the simulated broker, as :meth:`decisions`."""
        params = _page_params(symbol, start, end, limit, offset, order)
        return self._get("/v1/orders", OrderPage, params)

    def iter_decisions(
        self,
        symbol: str | None = None,
        start: Time = None,
        end: Time = None,
        *,
        order: Order = "asc",
        page_size: int = MAX_PAGE,
    ) -> Iterator[DecisionRow]:
        """Every matching decision, page after page."""
        return _pages(self.decisions, symbol, start, end, order, page_size)

    def iter_orders(
        self,
        symbol: str | None = None,
        start: Time = None,
        end: Time = None,
        *,
        order: Order = "asc",
        page_size: int = MAX_PAGE,
    ) -> Iterator[OrderRow]:
        """Every matching order, page after page."""
        return _pages(self.orders, symbol, start, end, order, page_size)

    def decisions_frame(
        self, symbol: str | None = None, start: Time = None, end: Time = None
    ) -> pd.DataFrame:
        """Every matching decision as a DataFrame, oldest first, one column per field."""
        return _frame(self.iter_decisions(symbol, start, end), DecisionRow)

    def orders_frame(
        self, symbol: str | None = None, start: Time = None, end: Time = None
    ) -> pd.DataFrame:
        """Every matching order as a DataFrame, oldest first, one column per field."""
        return _frame(self.iter_orders(symbol, start, end), OrderRow)

    def positions(self) -> Positions:
        """The current position of every symbol ever traded."""
        return self._get("/v1/positions", Positions)

    def pnl(self, points: int = 500) -> PnL:
        """P&L from the ledger's fills, with an equity curve of at most ``points`` samples."""
        return self._get("/v1/pnl", PnL, {"points": points})

    # -- models --------------------------------------------------------------------------

    def models(self, name: str | None = None) -> ModelList:
        """Every version of model ``name`` (the server's model by default), and which one
        is in production."""
        return self._get("/v1/models", ModelList, {"name": name} if name else None)

    def promote(self, version: int, name: str | None = None) -> ModelVersionOut:
        """Make ``version`` the production model (a trade key); /v1/score uses it next."""
        params = {"name": name} if name else None
        return self._post(f"/v1/models/{int(version)}/promote", ModelVersionOut, None, params)

    def upload_model(
        self,
        model_text: str,
        *,
        features: Sequence[str],
        label_spec: Any,
        fingerprint: str,
        name: str = "market",
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        reference: Any = None,
    ) -> ModelVersionOut:
        """Register LightGBM ``model_text`` as the next version of ``name`` (a trade key);
        promote it to serve. ``label_spec`` (a :class:`~rayfin.trading.LabelSpec`) and
        ``reference`` (a :class:`~rayfin.trading.monitoring.DriftReference`) may be given
        as objects or as their ``to_dict()``. :meth:`deploy_model` does all of this from
        a registry."""
        upload = ModelUpload(
            name=name,
            model_text=model_text,
            features=list(features),
            label_spec=_to_dict(label_spec) or {},
            fingerprint=fingerprint,
            params=dict(params or {}),
            metrics=dict(metrics or {}),
            reference=_to_dict(reference),
        )
        return self._post("/v1/models", ModelVersionOut, upload)

    def deploy_model(
        self,
        registry: ModelRegistry | str | Path,
        version: int | str | ModelVersion,
        *,
        name: str = "market",
        promote: bool = True,
    ) -> ModelVersionOut:
        """Upload a version of a local registry and promote it
        (:func:`rayfin.sdk.research.deploy`)."""
        from rayfin.sdk.research import deploy

        return deploy(self, registry, version, name=name, promote=promote)

    # -- LLM -----------------------------------------------------------------------------

    def sentiment(self, headlines: Sequence[str]) -> SentimentResult:
        """Negative / neutral / positive probabilities per headline, from the LLM swarm."""
        if isinstance(headlines, str):
            headlines = [headlines]  # one headline, not its characters
        return self._post(
            "/v1/sentiment", SentimentResult, SentimentRequest(headlines=list(headlines))
        )

    def generate(self, prompt: str, **options: Any) -> GenerateResult:
        """Text from the distributed LLM; ``options`` are
        :class:`~rayfin.serve.schemas.GenerateRequest` fields (``max_new_tokens``,
        ``temperature``, ``top_p``, ``seed``, ``chat``)."""
        return self._post("/v1/generate", GenerateResult, GenerateRequest(prompt=prompt, **options))

    # -- operations ----------------------------------------------------------------------

    def health(self) -> Health:
        """Whether the ledger, the model and the LLM answer (needs no key)."""
        return self._get("/v1/health", Health)

    def pipeline(self) -> PipelineStats:
        """The live consumers', trader's and LLM's figures."""
        return self._get("/v1/pipeline", PipelineStats)

    def metrics(self, *, all: bool = False) -> str:
        """rayfin's Prometheus metrics (``all``: Ray's too), as exposition text."""
        return self._request("GET", "/metrics", params={"all": "true"} if all else None).text


def _frame(rows: Iterable[BaseModel], model: type[BaseModel]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame([row.model_dump() for row in rows], columns=list(model.model_fields))


def connect(
    url: str,
    api_key: str | None,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_retries: int = DEFAULT_MAX_RETRIES,
) -> RayfinClient:
    """A :class:`RayfinClient` of the API at ``url`` with ``api_key`` (``X-API-Key``)."""
    return RayfinClient(url, api_key, timeout=timeout, max_retries=max_retries)
