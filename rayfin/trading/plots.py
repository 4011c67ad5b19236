"""The trading picture: price with the fills on it, and the equity curve below.

One plot for a backtest (:meth:`rayfin.trading.backtest.BacktestResult.plot`) and for a
live ledger (``rayfin demo``'s P&L plot).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def times(ns: pd.Series) -> pd.Series:
    """Event times in ns as UTC datetimes."""
    return pd.to_datetime(ns.to_numpy(np.int64), unit="ns", utc=True)


def plot_trading(
    path: str | Path,
    prices: pd.DataFrame,
    fills: pd.DataFrame,
    equity: pd.DataFrame,
    title: str,
) -> Path:
    """Write a PNG: ``prices`` (``ts``, ``price``) with ``fills`` (``ts``, ``price``,
    ``side``) on top, ``equity`` (``ts``, ``equity``) below."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    top.plot(times(prices["ts"]), prices["price"], lw=0.6, color="0.35", label="price")
    for side, marker, color in ((1, "^", "tab:green"), (-1, "v", "tab:red")):
        these = fills[fills["side"] == side] if len(fills) else fills
        if len(these):
            top.scatter(
                times(these["ts"]),
                these["price"],
                marker=marker,
                s=18,
                color=color,
                label="buy" if side == 1 else "sell",
                zorder=3,
            )
    top.set_ylabel("price")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(title)
    bottom.plot(times(equity["ts"]), equity["equity"], lw=0.8, color="tab:blue")
    bottom.set_ylabel("equity")
    bottom.ticklabel_format(axis="y", style="plain", useOffset=False)  # not "+1e6"
    top.ticklabel_format(axis="y", style="plain", useOffset=False)
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
