"""Quick start for researchers: real ES ticks, one-minute bars, and a local SmolLM2 answer.

.venv/bin/python examples/quickstart.py
"""

from __future__ import annotations

from rayfin.datasets import es_ticks
from rayfin.features.bars import BarBuilder
from rayfin.llm import chat_reply, load_local_model
from rayfin.stream.replay import frame_to_ticks


def main() -> None:
    ticks = es_ticks(limit=50_000)
    print(f"{len(ticks):,} ES trades from {ticks.timestamp.iloc[0]} to {ticks.timestamp.iloc[-1]}")

    builder = BarBuilder(seconds=60)
    bars = [
        b for t in frame_to_ticks(ticks) if (b := builder.update(t.symbol, t.ts, t.price, t.size))
    ]
    bars += builder.flush()
    last = bars[-1]
    print(f"{len(bars)} one-minute bars; last close {last.close:.2f}, vwap {last.vwap:.3f}")

    model, tokenizer = load_local_model("smollm2-135m")
    print(chat_reply(model, tokenizer, "What is a futures contract? One sentence."))


if __name__ == "__main__":
    main()
