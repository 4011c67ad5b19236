"""``/v1/score``: feature rows through the registered model and the threshold strategy.

:class:`LiveModel` keeps the version an alias points to loaded and follows the alias when
it moves (a promotion through the API, the CLI or another replica) within ``refresh_s``.
Scoring is :meth:`rayfin.trading.scoring.Model.predict_proba` and the decision is
:meth:`rayfin.trading.strategy.ThresholdStrategy.decide`: the code the live trader runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import numpy as np

from rayfin.errors import ModelInputError, ModelNotFoundError
from rayfin.serve.schemas import (
    DecisionOut,
    ModelRef,
    Probabilities,
    ScoreBatchResult,
    ScoreResult,
    ScoreRow,
)
from rayfin.trading.inputs import PRICE, required_columns
from rayfin.trading.orders import Action, Side, Signal, SourceKey
from rayfin.trading.registry import DEFAULT_ALIAS, ModelRegistry
from rayfin.trading.scoring import Model
from rayfin.trading.strategy import StrategyConfig, ThresholdStrategy

logger = logging.getLogger(__name__)

API_SOURCE = SourceKey("api", 0, 0)
"""The source of the orders a score proposes: they are never recorded."""


class NoModelError(ModelNotFoundError):
    """The alias points at no version yet."""


class LiveModel:
    """The version ``alias`` of model ``name`` points to, reloaded when the alias moves.

    Without :meth:`start`, :meth:`get` checks the alias itself once ``refresh_s`` has
    passed; after it, a background thread does, so requests never wait on the registry
    (an object store may take a while to answer)."""

    def __init__(
        self,
        registry: ModelRegistry,
        name: str,
        alias: str = DEFAULT_ALIAS,
        *,
        refresh_s: float = 2.0,
    ) -> None:
        self.registry = registry
        self.name = name
        self.alias = alias
        self.refresh_s = refresh_s
        self._model: Model | None = None
        self._checked = -float("inf")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def get(self) -> Model:
        """The current model; raises :class:`NoModelError` when none is promoted."""
        if self._thread is None and time.monotonic() - self._checked >= self.refresh_s:
            self.refresh()
        if self._model is None:
            raise NoModelError(
                f"model {self.name!r} has no {self.alias!r} version in {self.registry.root}: "
                "train one (`rayfin train`) or promote one (POST /v1/models/{version}/promote)"
            )
        return self._model

    def refresh(self) -> None:
        """Follow the alias now (after a promotion made here, say)."""
        with self._lock:
            try:
                version = self.registry.get(self.name, self.alias)
            except ModelNotFoundError:
                self._model = None
            else:
                if self._model is None or self._model.version.version != version.version:
                    self._model = self.registry.load(self.name, version.version)
            self._checked = time.monotonic()

    def start(self) -> None:
        """Load now, then follow the alias from a background thread."""
        self.refresh()
        self._thread = threading.Thread(target=self._follow, name="rayfin-model", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _follow(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception:  # a registry briefly unreachable: keep serving the model held
                logger.warning("cannot refresh model %r", self.name, exc_info=True)


class Scorer:
    """Score rows with a :class:`LiveModel` and decide with the threshold strategy."""

    def __init__(self, model: LiveModel, strategy: StrategyConfig) -> None:
        self.model = model
        self.strategy = ThresholdStrategy(strategy)

    def score(self, rows: Sequence[ScoreRow]) -> ScoreBatchResult:
        model = self.model.get()
        columns = _columns(rows, model)
        sentiment = np.array(
            [np.nan if r.sentiment is None else r.sentiment for r in rows], dtype=np.float64
        )
        probs = model.predict_proba(columns, sentiment)
        ref = ModelRef(name=model.version.name, version=model.version.version)
        now = time.time_ns()
        results = [
            ScoreResult(
                symbol=row.symbol,
                model=ref,
                probabilities=Probabilities(down=p[0], flat=p[1], up=p[2]),
                decision=self._decide(row, p, now),
            )
            for row, p in zip(rows, probs.tolist(), strict=True)
        ]
        return ScoreBatchResult(model=ref, results=results)

    def _decide(self, row: ScoreRow, probs: list[float], now_ns: int) -> DecisionOut:
        total = sum(probs)  # LightGBM's softmax sums to 1 up to rounding; Signal checks 1e-4
        signal = Signal(
            row.symbol,
            _ns(row, now_ns),
            row.price,
            (probs[0] / total, probs[1] / total, probs[2] / total),
            API_SOURCE,
            row.sentiment or 0.0,
        )
        proposal = self.strategy.decide(signal, row.position)
        threshold = self.strategy.config.threshold
        order = proposal.order
        if order is None:
            return DecisionOut(
                action=Action.HOLD.value, reason=proposal.reason, threshold=threshold
            )
        action = Action.BUY if order.side == Side.BUY else Action.SELL
        return DecisionOut(
            action=action.value,
            quantity=order.quantity,
            purpose=order.purpose.value,
            threshold=threshold,
        )


def _ns(row: ScoreRow, default: int) -> int:
    if row.ts is None:
        return default
    return max(0, round(row.ts.timestamp() * 1e9))


def _columns(rows: Sequence[ScoreRow], model: Model) -> dict[str, np.ndarray]:
    """The feature columns ``model`` needs, one value per row; names what rows lack."""
    needed = sorted({c for name in model.features for c in required_columns(name) if c != PRICE})
    columns: dict[str, np.ndarray] = {PRICE: np.array([r.price for r in rows], dtype=np.float64)}
    missing: dict[str, list[int]] = {}
    for name in needed:
        values = np.empty(len(rows), dtype=np.float64)
        for i, row in enumerate(rows):
            if name not in row.features:
                missing.setdefault(name, []).append(i)
                continue
            value = row.features[name]
            values[i] = np.nan if value is None else value
        columns[name] = values
    if missing:
        if len(rows) == 1:
            where = ", ".join(sorted(missing))
        else:
            where = ", ".join(
                f"{name} (rows {at[:5]}{'...' if len(at) > 5 else ''})"
                for name, at in sorted(missing.items())
            )
        raise ModelInputError(
            f"{model.version.name} v{model.version.version} needs features the request "
            f"lacks: {where}"
        )
    return columns
