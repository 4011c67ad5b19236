"""The threshold strategy: act when the model is confident enough that price goes one way.

Pure and deterministic: :meth:`ThresholdStrategy.decide` looks only at the signal and the
position it is given, never at a clock or any state of its own.

Rules, for a signal with class probabilities (down, flat, up):

* **Direction.** Long if P(up) ≥ ``threshold``, short if P(down) ≥ ``threshold``,
  otherwise hold (``below_threshold``). The threshold is above 0.5, so at most one side
  qualifies.
* **Size** (the target position, in contracts). ``base_quantity``; with
  ``scale_by_confidence``, it grows linearly from ``base_quantity`` at the threshold to
  ``max_quantity`` at probability 1, rounded down.
* **Flat:** an ``entry`` order for the size.
* **Already in the signal's direction:** hold (``same_direction``), except that with
  ``scale_in`` a position smaller than the size is topped up to it (``entry``), and a
  position above ``max_quantity`` (the limit was lowered) is trimmed to it (``reduce``).
* **Opposite:** with ``on_opposite="reverse"`` (the default) one ``entry`` order closes
  the position and opens the size the other way; with ``"exit"`` an ``exit`` order only
  closes it.

``position_qty`` should include orders submitted but not yet filled
(:meth:`~rayfin.trading.execution.SimulatedBroker.pending_quantity`), or a signal that
arrives before the next tick would be acted on twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from rayfin.errors import ConfigError, TradingError
from rayfin.trading.orders import (
    BELOW_THRESHOLD,
    HOLD_REASONS,
    SAME_DIRECTION,
    Order,
    Purpose,
    Side,
    Signal,
)

__all__ = ["Proposal", "StrategyConfig", "ThresholdStrategy"]

# Confidence scaling floors (p - threshold) / (1 - threshold) * span; this much slack keeps
# a probability that is mathematically on a step (0.85 of the way) from falling below it.
_STEP_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class StrategyConfig:
    """Thresholds and sizing of :class:`ThresholdStrategy` (see the module docstring)."""

    threshold: float = 0.7
    base_quantity: int = 1
    max_quantity: int = 5
    scale_by_confidence: bool = False
    scale_in: bool = False
    on_opposite: Literal["reverse", "exit"] = "reverse"

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and 0.5 < self.threshold <= 1.0):
            raise ConfigError(
                f"StrategyConfig: threshold must be in (0.5, 1] so that only one side can "
                f"qualify, got {self.threshold!r}"
            )
        for name in ("base_quantity", "max_quantity"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"StrategyConfig: {name} must be an int >= 1, got {value!r}")
        if self.max_quantity < self.base_quantity:
            raise ConfigError(
                f"StrategyConfig: max_quantity ({self.max_quantity}) is below base_quantity "
                f"({self.base_quantity})"
            )
        if self.on_opposite not in ("reverse", "exit"):
            raise ConfigError(
                f"StrategyConfig: on_opposite must be 'reverse' or 'exit', got {self.on_opposite!r}"
            )


@dataclass(frozen=True, slots=True)
class Proposal:
    """The strategy's answer to a signal: an order, or the reason there is none (one of
    :data:`~rayfin.trading.orders.HOLD_REASONS`)."""

    order: Order | None
    reason: str | None = None

    def __post_init__(self) -> None:
        if (self.order is None) == (self.reason is None):
            raise TradingError("Proposal: give either an order or a hold reason, not both")
        if self.reason is not None and self.reason not in HOLD_REASONS:
            raise TradingError(f"Proposal: {self.reason!r} is not one of {HOLD_REASONS}")


class ThresholdStrategy:
    """Turns signals into orders by :class:`StrategyConfig`'s rules."""

    __slots__ = ("config",)

    def __init__(self, config: StrategyConfig | None = None) -> None:
        self.config = config or StrategyConfig()

    def size(self, probability: float) -> int:
        """The target position size, in contracts, for a side with ``probability``."""
        cfg = self.config
        if not cfg.scale_by_confidence or cfg.max_quantity == cfg.base_quantity:
            return cfg.base_quantity
        span = 1.0 - cfg.threshold
        fraction = 1.0 if span == 0 else (probability - cfg.threshold) / span
        fraction = min(max(fraction, 0.0), 1.0)
        steps = math.floor(fraction * (cfg.max_quantity - cfg.base_quantity) + _STEP_EPSILON)
        return cfg.base_quantity + steps

    def decide(self, signal: Signal, position_qty: int) -> Proposal:
        """The order to send for ``signal`` given the signed ``position_qty`` (including
        pending orders), or the reason to hold."""
        if not isinstance(position_qty, int) or isinstance(position_qty, bool):
            raise TradingError(f"position_qty must be an int, got {position_qty!r}")
        cfg = self.config
        if signal.p_up >= cfg.threshold:
            side, probability = Side.BUY, signal.p_up
        elif signal.p_down >= cfg.threshold:
            side, probability = Side.SELL, signal.p_down
        else:
            return Proposal(None, BELOW_THRESHOLD)
        target = self.size(probability)
        held = position_qty * int(side)  # > 0: already that way, < 0: the other way

        if held == 0:
            return self._order(signal, side, target, Purpose.ENTRY)
        if held > 0:
            if held > cfg.max_quantity:
                return self._order(signal, side.opposite, held - cfg.max_quantity, Purpose.REDUCE)
            if cfg.scale_in and held < target:
                return self._order(signal, side, target - held, Purpose.ENTRY)
            return Proposal(None, SAME_DIRECTION)
        if cfg.on_opposite == "exit":
            return self._order(signal, side, -held, Purpose.EXIT)
        return self._order(signal, side, -held + target, Purpose.ENTRY)

    @staticmethod
    def _order(signal: Signal, side: Side, quantity: int, purpose: Purpose) -> Proposal:
        return Proposal(
            Order.create(signal.symbol, side, quantity, signal.ts, purpose, signal.source)
        )
