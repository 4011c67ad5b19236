"""The HTTP API: a FastAPI app over rayfin's parts, versioned under ``/v1``.

:func:`create_api` builds the app around one :class:`Services` (the parts it composes:
the live model and strategy, the ledger, the model registry, the LLM deployment), so the
same app runs as the Ray Serve ingress (:mod:`rayfin.serve.deployment`) or under any ASGI
server. Routes hold no logic of their own: they check the caller, call the part, and
shape the answer with :mod:`rayfin.serve.schemas`.

Every request but ``/v1/health``, ``/metrics`` and the dashboard page needs an API key
(``X-API-Key``); ``trade`` keys may also promote and upload models. Bodies above
``max_body_bytes`` are refused with 413 before they are read whole, invalid ones get 422
naming each bad field, and a key over its rate gets 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BeforeValidator

from rayfin import __version__
from rayfin.config import ApiKey, Settings, get_settings
from rayfin.errors import TrainingError
from rayfin.serve import schemas as s
from rayfin.serve.auth import KEY_HEADER, Caller, KeyRing, RateLimiter, Role, digest
from rayfin.serve.llm import LLMOptions
from rayfin.serve.metrics import ApiMetrics, RequestMetrics, cluster_metrics
from rayfin.serve.pipeline import pipeline_stats
from rayfin.serve.problems import ApiError, error_response, install
from rayfin.serve.schemas import check_event_time, iso_text
from rayfin.serve.scoring import LiveModel, Scorer
from rayfin.serve.views import LedgerViews, PageQuery

if TYPE_CHECKING:
    from rayfin.trading.registry import ModelVersion

DASHBOARD = "dashboard.html"


@dataclass(frozen=True)
class ApiOptions:
    """Everything the API needs, explicit, so that replicas on other nodes need no
    settings of their own. Build it with :meth:`from_settings`."""

    keys: tuple[ApiKey, ...]
    ledger_url: str
    registry: str
    model: str = "market"
    threshold: float = 0.7
    ledger_schema: str | None = None
    rate_limit_per_s: float = 200.0
    rate_limit_burst: int = 400
    max_body_bytes: int = 64 * 1024
    max_upload_bytes: int = 32 * 1024 * 1024
    model_refresh_s: float = 2.0
    llm: LLMOptions | None = None
    replicas: int = 1
    llm_replicas: int = 1

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides: Any) -> ApiOptions:
        """Options from the settings in force; keys travel as digests only."""
        settings = settings or get_settings()
        serve = settings.serve
        keys = tuple(
            ApiKey(
                name=k.name,
                role=k.role,
                sha256=k.sha256 or digest(k.key.get_secret_value()),  # type: ignore[union-attr]
                rate_limit_per_s=k.rate_limit_per_s,
                rate_limit_burst=k.rate_limit_burst,
            )
            for k in serve.api_keys
        )
        trading = settings.trading
        assert settings.database.url is not None
        assert trading.registry is not None
        assert serve.llm is not None
        options = cls(
            keys=keys,
            ledger_url=settings.database.url,
            registry=trading.registry,
            model=trading.model,
            threshold=trading.threshold,
            rate_limit_per_s=serve.rate_limit_per_s,
            rate_limit_burst=serve.rate_limit_burst,
            max_body_bytes=serve.max_body_bytes,
            max_upload_bytes=serve.max_upload_bytes,
            llm=LLMOptions(
                model=serve.llm,
                swarm=serve.swarm,
                adapter=serve.sentiment_adapter,
                max_prompt_tokens=serve.max_prompt_tokens,
                max_new_tokens=serve.max_new_tokens,
            ),
            replicas=serve.replicas,
            llm_replicas=serve.llm_replicas,
        )
        return replace(options, **overrides)


@dataclass
class Services:
    """The parts behind the routes, built once per replica."""

    options: ApiOptions
    llm: Any = None  # a DeploymentHandle to rayfin.serve.llm.LLMService, or None
    keys: KeyRing = field(init=False)
    limiter: RateLimiter = field(init=False)
    metrics: ApiMetrics | None = field(init=False)

    def __post_init__(self) -> None:
        import ray

        from rayfin.trading.ledger import Ledger
        from rayfin.trading.registry import ModelRegistry
        from rayfin.trading.strategy import StrategyConfig

        options = self.options
        self.keys = KeyRing(options.keys)
        self.limiter = RateLimiter(options.rate_limit_per_s, options.rate_limit_burst)
        self.metrics = ApiMetrics() if ray.is_initialized() else None
        self.registry = ModelRegistry(options.registry)
        self.ledger = Ledger(options.ledger_url, schema=options.ledger_schema)
        self.views = LedgerViews(self.ledger)
        self.live_model = LiveModel(self.registry, options.model, refresh_s=options.model_refresh_s)
        self.live_model.start()
        self.scorer = Scorer(self.live_model, StrategyConfig(threshold=options.threshold))

    def close(self) -> None:
        self.live_model.stop()
        self.ledger.close()


# --- request checks -------------------------------------------------------------------------

_key_header = APIKeyHeader(
    name=KEY_HEADER,
    auto_error=False,
    description="An API key; `rayfin serve keygen` makes one. Read keys may call every "
    "GET and the scoring and LLM endpoints; trade keys may also promote and upload models.",
)


def _services(request: Request) -> Services:
    return request.app.state.services


def _query_names(dependant: Any) -> frozenset[str]:
    """The query parameters a route (its dependencies included) declares."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return frozenset(names)


def known_query(request: Request) -> None:
    """Refuse query parameters the route does not declare: as with bodies, a misspelt
    option (``?ordr=desc``) must not be silently ignored."""
    route = request.scope.get("route")
    if route is None or not request.query_params:
        return
    known = getattr(route, "rayfin_query_names", None)
    if known is None:
        known = route.rayfin_query_names = _query_names(route.dependant)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise ApiError(
            422,
            "validation_error",
            f"query: unknown parameter(s) {', '.join(map(repr, unknown))}; this endpoint "
            f"takes {', '.join(sorted(known)) or 'none'}",
        )


def require(role: Role) -> Any:
    """A dependency admitting holders of a ``role`` key, within their rate limit."""

    def check(request: Request, key: Annotated[str | None, Security(_key_header)] = None) -> Caller:
        services = _services(request)
        if key is None:
            bearer = request.headers.get("authorization", "")
            if bearer[:7].lower() == "bearer ":
                key = bearer[7:].strip()
        caller = services.keys.identify(key)
        metrics = services.metrics
        if caller is None:
            if metrics:
                metrics.refuse("unauthorized")
            raise ApiError(
                401,
                "unauthorized",
                f"a valid API key is required in the {KEY_HEADER} header",
                headers={"WWW-Authenticate": f'ApiKey header="{KEY_HEADER}"'},
            )
        if not caller.may(role):
            if metrics:
                metrics.refuse("forbidden")
            raise ApiError(
                403, "forbidden", f"this needs a {role} key; {caller.name!r} is {caller.role}"
            )
        wait = services.limiter.acquire(caller)
        if wait > 0:
            if metrics:
                metrics.refuse("rate_limited")
            rate, _ = services.limiter.limits(caller)
            raise ApiError(
                429,
                "rate_limited",
                f"{caller.name!r} is over its rate limit of {rate:g} requests/s; retry in "
                f"{wait:.2f} s",
                headers={"Retry-After": str(max(1, round(wait + 0.5)))},
            )
        return caller

    return check


Reader = Annotated[Caller, Depends(require("read"))]
Trader = Annotated[Caller, Depends(require("trade"))]
Svc = Annotated[Services, Depends(_services)]


class BodyLimit:
    """ASGI middleware refusing bodies over the limit with 413: by ``Content-Length`` before
    reading a byte, or, for a chunked body, as soon as the bytes received pass the limit
    (such a body is read here, at most the limit's worth, and handed on whole)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        services: Services = scope["app"].state.services
        options = services.options
        upload = scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/models"
        limit = options.max_upload_bytes if upload else options.max_body_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            # The HTTP server delivers no more than Content-Length bytes.
            if not length.isdigit() or int(length) > limit:
                await _too_large(services, limit)(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(services, limit)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _too_large(services: Services, limit: int) -> Any:
    if services.metrics:
        services.metrics.refuse("too_large")
    return error_response(
        413, "too_large", f"the request body is over the limit of {limit:,} bytes"
    )


# --- the app --------------------------------------------------------------------------------

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": s.ErrorBody, "description": "No API key, or an unknown one"},
    413: {"model": s.ErrorBody, "description": "The body (or prompt) is too large"},
    422: {"model": s.ErrorBody, "description": "The request is invalid; each bad field named"},
    429: {"model": s.ErrorBody, "description": "Over the key's rate limit; see Retry-After"},
}
TRADE_ERRORS = {**ERRORS, 403: {"model": s.ErrorBody, "description": "Needs a trade key"}}
UNAVAILABLE = {503: {"model": s.ErrorBody, "description": "A part is not running yet"}}
NOT_FOUND = {404: {"model": s.ErrorBody, "description": "No such model or version"}}

SymbolQuery = Annotated[
    str | None, Query(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9._:/-]+$")
]
StartQuery = Annotated[
    dt.datetime | None,
    Query(description="from this time (ISO 8601, aware)"),
    BeforeValidator(iso_text),
]
EndQuery = Annotated[
    dt.datetime | None,
    Query(description="before this time (ISO 8601, aware)"),
    BeforeValidator(iso_text),
]
LimitQuery = Annotated[int, Query(ge=1, le=s.MAX_PAGE)]
OffsetQuery = Annotated[int, Query(ge=0, le=2**31 - 1)]
OrderQuery = Annotated[Literal["asc", "desc"], Query(description="oldest or newest first")]
ModelName = Annotated[str | None, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


def page_query(
    symbol: SymbolQuery = None,
    start: StartQuery = None,
    end: EndQuery = None,
    limit: LimitQuery = 100,
    offset: OffsetQuery = 0,
    order: OrderQuery = "asc",
) -> PageQuery:
    """The filter and page of /v1/decisions and /v1/orders."""
    return PageQuery(
        symbol, _aware(start, "start"), _aware(end, "end"), limit, offset, order == "desc"
    )


Paged = Annotated[PageQuery, Depends(page_query)]


def _aware(value: dt.datetime | None, name: str) -> dt.datetime | None:
    """``value`` if it is timezone-aware and within the ledger's clock (int64 ns)."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ApiError(
            422, "validation_error", f"query.{name}: give a timezone (e.g. 2013-09-03T14:30:00Z)"
        )
    try:
        return check_event_time(value, f"query.{name}")
    except ValueError as exc:
        raise ApiError(422, "validation_error", str(exc)) from None


def create_api(services: Services | None) -> FastAPI:
    """The rayfin HTTP API over ``services`` (None: an app only to describe the API, for
    its OpenAPI spec)."""
    app = FastAPI(
        title="rayfin",
        # Operation ids are the route names (score, decisions, promote...): what generated
        # clients call their methods.
        generate_unique_id_function=lambda route: route.name,
        dependencies=[Depends(known_query)],
        version=__version__,
        summary="Market decisions, trading state and the distributed LLM over HTTP.",
        description=(
            "Scores features with the production LightGBM model and the threshold strategy, "
            "reads the trading ledger, and runs the distributed SmolLM2 swarm for text and "
            "news sentiment. Authenticate with an `X-API-Key` header."
        ),
        openapi_tags=[
            {"name": "trading", "description": "Scores, decisions, orders, positions, P&L"},
            {"name": "models", "description": "The market model registry"},
            {"name": "llm", "description": "The distributed LLM"},
            {"name": "operations", "description": "Health, metrics, the live pipeline"},
        ],
    )
    app.state.services = services
    install(app)
    app.add_middleware(BodyLimit)
    app.add_middleware(RequestMetrics)

    # -- trading -----------------------------------------------------------------------------

    @app.post(
        "/v1/score",
        tags=["trading"],
        responses={**ERRORS, **UNAVAILABLE},
        summary="Class probabilities and the strategy's decision for one tick's features",
    )
    async def score(body: s.ScoreRow, svc: Svc, _: Reader) -> s.ScoreResult:
        # Under a millisecond of CPU: run here rather than pay a thread hand-off.
        return svc.scorer.score([body]).results[0]

    @app.post(
        "/v1/score/batch",
        tags=["trading"],
        responses={**ERRORS, **UNAVAILABLE},
        summary="Score many rows in one model pass",
    )
    def score_batch(body: s.ScoreBatch, svc: Svc, _: Reader) -> s.ScoreBatchResult:
        return svc.scorer.score(body.rows)

    @app.get("/v1/decisions", tags=["trading"], responses=ERRORS)
    def decisions(svc: Svc, _: Reader, page: Paged) -> s.DecisionPage:
        """Recorded decisions (orders proposed: accepted or rejected by risk), paged."""
        return svc.views.decisions(page)

    @app.get("/v1/orders", tags=["trading"], responses=ERRORS)
    def orders(svc: Svc, _: Reader, page: Paged) -> s.OrderPage:
        """Orders sent to the simulated broker (strategy and protective), paged."""
        return svc.views.orders(page)

    @app.get("/v1/positions", tags=["trading"], responses=ERRORS)
    def positions(svc: Svc, _: Reader) -> s.Positions:
        """The current position of every symbol ever traded."""
        return svc.views.positions()

    @app.get("/v1/pnl", tags=["trading"], responses=ERRORS)
    def pnl(svc: Svc, _: Reader, points: Annotated[int, Query(ge=2, le=5000)] = 500) -> s.PnL:
        """Realized and unrealized P&L, drawdown and the equity curve, from the fills."""
        return svc.views.pnl(points)

    # -- models ------------------------------------------------------------------------------

    @app.get("/v1/models", tags=["models"], responses={**ERRORS, **NOT_FOUND})
    def models(svc: Svc, _: Reader, name: ModelName = None) -> s.ModelList:
        """Every registered version of the model, and which one is in production."""
        return _model_list(svc, name or svc.options.model)

    @app.post(
        "/v1/models/{version}/promote",
        tags=["models"],
        responses={**TRADE_ERRORS, **NOT_FOUND},
    )
    def promote(
        svc: Svc,
        caller: Trader,
        version: Annotated[int, Path(ge=1, le=10**9)],
        name: ModelName = None,
    ) -> s.ModelVersionOut:
        """Point ``production`` at a version: /v1/score uses it from the next request on
        this replica, within ``model_refresh_s`` on the others."""
        model = name or svc.options.model
        svc.registry.promote(model, version)
        if model == svc.options.model:
            svc.live_model.refresh()
        return _version_out(svc, model, version)

    @app.post("/v1/models", tags=["models"], status_code=201, responses=TRADE_ERRORS)
    def upload(svc: Svc, caller: Trader, body: s.ModelUpload) -> s.ModelVersionOut:
        """Register a model trained elsewhere as the next version (promote it to serve)."""
        number = _register(svc, body)
        return _version_out(svc, body.name, number)

    # -- LLM ---------------------------------------------------------------------------------

    @app.post("/v1/sentiment", tags=["llm"], responses={**ERRORS, **UNAVAILABLE})
    async def sentiment(body: s.SentimentRequest, svc: Svc, _: Reader) -> s.SentimentResult:
        """Negative / neutral / positive probabilities per headline, from the LLM."""
        return await _llm(svc).sentiment.remote(body.headlines)

    @app.post("/v1/generate", tags=["llm"], responses={**ERRORS, **UNAVAILABLE})
    async def generate(body: s.GenerateRequest, svc: Svc, _: Reader) -> s.GenerateResult:
        """Text from the distributed LLM (greedy unless a temperature is given)."""
        return await _llm(svc).generate.remote(body)

    # -- operations --------------------------------------------------------------------------

    @app.get("/v1/health", tags=["operations"])
    async def health(svc: Svc) -> s.Health:
        """Whether each part answers; no key needed (for load balancers)."""
        return await _health(svc)

    @app.get("/v1/pipeline", tags=["operations"], responses=ERRORS)
    async def pipeline(svc: Svc, _: Reader) -> s.PipelineStats:
        """The live consumers' and trader's figures, and the LLM's."""
        llm = None
        if svc.llm is not None:
            try:
                llm = await asyncio.wait_for(svc.llm.stats.remote(), 2.0)
            except Exception:  # a busy or restarting LLM replica: report without it
                llm = None
        return await run_in_threadpool(pipeline_stats, llm)

    @app.get(
        "/metrics",
        tags=["operations"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}},
    )
    async def metrics(all: Annotated[bool, Query()] = False) -> Response:
        """rayfin's Prometheus metrics from every node of the cluster (``all``: Ray's too)."""
        body = await run_in_threadpool(cluster_metrics, all)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/dashboard", tags=["operations"], response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        """Live P&L, positions, decisions and the pipeline, in a browser."""
        page = resources.files("rayfin.serve").joinpath("static", DASHBOARD).read_text()
        return HTMLResponse(page)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    return app


def openapi_spec() -> dict[str, Any]:
    """The API's OpenAPI document, without running anything."""
    return create_api(None).openapi()


def _llm(svc: Services) -> Any:
    if svc.llm is None:
        raise ApiError(503, "llm_unavailable", "this API was started without the LLM deployment")
    return svc.llm


def _described(version: ModelVersion, aliases: dict[str, int]) -> s.ModelVersionOut:
    """A registered version as the API shows it, with the aliases pointing at it now."""
    return s.ModelVersionOut(
        name=version.name,
        version=version.version,
        created=version.created,
        features=list(version.features),
        metrics=version.metrics,
        aliases=sorted(a for a, n in aliases.items() if n == version.version),
    )


def _version_out(svc: Services, name: str, number: int) -> s.ModelVersionOut:
    return _described(svc.registry.get(name, number), svc.registry.aliases(name))


def _model_list(svc: Services, name: str) -> s.ModelList:
    from rayfin.trading.registry import DEFAULT_ALIAS

    versions = svc.registry.versions(name)
    aliases = svc.registry.aliases(name)
    return s.ModelList(
        name=name,
        production=aliases.get(DEFAULT_ALIAS),
        versions=[_described(v, aliases) for v in versions],
    )


def _register(svc: Services, body: s.ModelUpload) -> int:
    """Check an uploaded model loads and scores as a rayfin model, then register it."""
    import lightgbm

    from rayfin.trading.labels import LabelSpec
    from rayfin.trading.monitoring import DriftReference
    from rayfin.trading.registry import ModelVersion
    from rayfin.trading.scoring import Model

    try:
        spec = LabelSpec.from_dict(body.label_spec)
        reference = None if body.reference is None else DriftReference.from_dict(body.reference)
    except (KeyError, TypeError, ValueError) as exc:
        raise TrainingError(f"label_spec or reference is malformed: {exc!r}") from None
    unregistered = ModelVersion(
        name=body.name,
        version=0,
        created="",
        params=body.params,
        metrics=body.metrics,
        features=tuple(body.features),
        label_spec=spec,
        fingerprint=body.fingerprint,
        lightgbm_version=lightgbm.__version__,
    )
    Model.from_text(body.model_text, unregistered)  # raises RegistryError when unusable
    version = svc.registry.register(
        body.model_text,
        name=body.name,
        features=body.features,
        label_spec=spec,
        fingerprint=body.fingerprint,
        params=body.params,
        metrics=body.metrics,
        reference=reference,
    )
    return version.version


async def _health(svc: Services) -> s.Health:
    components: dict[str, s.ComponentHealth] = {}
    try:
        await run_in_threadpool(svc.ledger.positions)
        components["ledger"] = s.ComponentHealth(status="ok", detail=svc.ledger.url)
    except Exception as exc:  # the database is down or unreachable: say so, don't fail
        components["ledger"] = s.ComponentHealth(status="down", detail=str(exc)[:300])
    try:
        model = svc.live_model.get()
        components["model"] = s.ComponentHealth(status="ok", detail=repr(model))
    except Exception as exc:
        components["model"] = s.ComponentHealth(status="absent", detail=str(exc)[:300])
    if svc.llm is None:
        components["llm"] = s.ComponentHealth(status="absent", detail="not deployed")
    else:
        try:
            status, detail = await asyncio.wait_for(svc.llm.health.remote(), 5.0)
            components["llm"] = s.ComponentHealth(status=status, detail=detail)
        except Exception as exc:
            components["llm"] = s.ComponentHealth(status="down", detail=str(exc)[:300])
    ready = components["ledger"].status == "ok" and components["model"].status == "ok"
    return s.Health(
        status="ok" if ready else "degraded", version=__version__, components=components
    )
