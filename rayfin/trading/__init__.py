"""From features to decisions and money: labels, training with tuning, the model registry,
scoring, the threshold strategy under risk limits, simulated execution, the ledger, P&L,
backtests and the feedback loop.

The SDK's entry points are :func:`train_model`, :func:`backtest` and, live,
:class:`LiveTrader` (behind :class:`rayfin.actors.trader.TradingActor`, fed by the feature
consumers); the live path and the backtest share :class:`Trader` (model, then
:class:`TradingEngine`)."""

from rayfin.trading.backtest import BacktestResult, backtest
from rayfin.trading.engine import SignalBatch, Trader, TradingConfig, TradingEngine
from rayfin.trading.execution import FeeModel, SimulatedBroker, SlippageModel
from rayfin.trading.labels import CLASS_NAMES, DOWN, FLAT, UP, LabelSpec, make_labels
from rayfin.trading.ledger import Ledger, LedgerBatch, TraderCheckpoint
from rayfin.trading.live import LiveTrader
from rayfin.trading.orders import Decision, Fill, Instrument, Instruments, Order, Signal
from rayfin.trading.pnl import Portfolio
from rayfin.trading.registry import ModelRegistry, ModelVersion
from rayfin.trading.risk import RiskLimits, RiskManager, RiskState
from rayfin.trading.scoring import Model
from rayfin.trading.strategy import StrategyConfig, ThresholdStrategy
from rayfin.trading.training import SearchSpace, train_model

__all__ = [
    "CLASS_NAMES",
    "DOWN",
    "FLAT",
    "UP",
    "BacktestResult",
    "Decision",
    "FeeModel",
    "Fill",
    "Instrument",
    "Instruments",
    "LabelSpec",
    "Ledger",
    "LedgerBatch",
    "LiveTrader",
    "Model",
    "ModelRegistry",
    "ModelVersion",
    "Order",
    "Portfolio",
    "RiskLimits",
    "RiskManager",
    "RiskState",
    "SearchSpace",
    "Signal",
    "SignalBatch",
    "SimulatedBroker",
    "SlippageModel",
    "StrategyConfig",
    "ThresholdStrategy",
    "Trader",
    "TraderCheckpoint",
    "TradingConfig",
    "TradingEngine",
    "backtest",
    "make_labels",
    "train_model",
]
