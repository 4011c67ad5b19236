"""Quick start for researchers: real ES ticks, one-minute bars, and a local SmolLM2 answer.

.venv/bin/python examples/quickstart.py
"""

from __future__ import annotations

import torch

from rayfin.datasets import es_ticks
from rayfin.features.bars import BarBuilder
from rayfin.llm import load_local_model
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
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is a futures contract? One sentence."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


if __name__ == "__main__":
    main()
