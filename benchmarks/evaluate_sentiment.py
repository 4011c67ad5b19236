"""News sentiment on the bundled financial headlines: VADER vs zero-shot vs LoRA-tuned
SmolLM2 on the distributed LLM. Prints one JSON object.

Starts a local Ray and a 3-stage SmolLM2-135M swarm, scores the validation and test
splits of :func:`rayfin.datasets.load_headlines` with the VADER lexicon, the zero-shot LLM
(label log-probabilities) and the LLM with a client-held LoRA adapter trained on the train
split only (fixed settings below, chosen before looking at the test split), and saves the
adapter to the hub as ``news-sentiment``.

    .venv/bin/python benchmarks/evaluate_sentiment.py [--epochs 2] [--lr 1e-3]
        [--hub PATH] [--write docs/RESULTS.md]

``--write`` replaces the ``news-sentiment`` section of that Markdown file. Progress goes
to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from typing import Any

import ray

from rayfin.datasets import load_headlines
from rayfin.llm import DistributedCausalLM, launch_swarm
from rayfin.sentiment.lexicon import VaderScorer
from rayfin.sentiment.llm import LLMSentimentScorer
from rayfin.sentiment.metrics import evaluate
from rayfin.sentiment.scoring import LABELS
from rayfin.trading.evaluation import update_results_section

SECTION = "news-sentiment"
MODEL = "smollm2-135m"


def _row(name: str, report: dict[str, Any]) -> str:
    f1 = " | ".join(f"{report['per_class'][label]['f1']:.3f}" for label in LABELS)
    return f"| {name} | {report['accuracy']:.1%} | {report['macro_f1']:.4f} | {f1} |"


def markdown(results: dict[str, Any]) -> str:
    test, val = results["test"], results["validation"]
    tuned = results["training"]
    lines = [
        "## News sentiment: VADER vs zero-shot and LoRA-tuned SmolLM2",
        "",
        f"Written by `benchmarks/evaluate_sentiment.py --write docs/RESULTS.md` on "
        f"{results['date']} ({results['machine']}; {results['minutes']:.1f} min end to end).",
        "",
        f"- Data: the bundled financial headlines ([headlines.md](headlines.md)): "
        f"{results['sizes']['train']} train, {results['sizes']['validation']} validation, "
        f"{results['sizes']['test']} test, balanced over negative / neutral / positive. "
        "The test split is scored once, by this script; nothing is chosen on it.",
        "- VADER: the `vaderSentiment` lexicon, compound ≥ 0.05 positive, ≤ −0.05 negative.",
        "- Zero-shot: SmolLM2-135M-Instruct on a 3-stage swarm; the chat-template prompt "
        "(chosen among three on validation) ends with `Sentiment:`, and the probabilities "
        "are a softmax over the next-token logits of ` negative`, ` neutral`, ` positive`.",
        f"- LoRA-tuned: the same readout with a client-held LoRA adapter (rank "
        f"{tuned['rank']}, alpha {tuned['alpha']}, {', '.join(tuned['targets'])}), trained "
        f"on the train split for {tuned['epochs']} epochs (AdamW, lr {tuned['lr']}, batch "
        f"{tuned['batch_size']}; {tuned['steps']} steps in {tuned['seconds']:.0f} s, "
        f"{tuned['steps_per_s']:.2f} steps/s, final loss {tuned['final_loss']:.3f}); the "
        f"servers' weights were unchanged (checksums before and after). Saved to the hub as "
        f"`{tuned['adapter']}`.",
        "- Caveat: one author wrote and labelled every headline, so the tuned adapter learns "
        "that author's labelling as well as finance; expect less on real newswire.",
        "",
        "### Test split",
        "",
        "| scorer | accuracy | macro-F1 | F1 negative | F1 neutral | F1 positive |",
        "|---|---|---|---|---|---|",
        *(_row(name, test[name]) for name in test),
        "",
        "### Validation split",
        "",
        "| scorer | accuracy | macro-F1 | F1 negative | F1 neutral | F1 positive |",
        "|---|---|---|---|---|---|",
        *(_row(name, val[name]) for name in val),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hub", default=None, help="adapter hub path (default: state dir)")
    parser.add_argument("--write", default=None, help="Markdown file to update")
    args = parser.parse_args()
    begin = time.perf_counter()
    splits = {name: load_headlines(name) for name in ("train", "validation", "test")}

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    swarm = launch_swarm(MODEL, name="sentiment-eval", num_stages=3, num_cpus=0.5)
    try:
        client = DistributedCausalLM.from_pretrained(MODEL, swarm=swarm)
        scorer = LLMSentimentScorer(client)
        digests = {r.server_id: ray.get(r.handle.weights_digest.remote()) for r in swarm.servers()}
        scores: dict[str, dict[str, Any]] = {"validation": {}, "test": {}}
        vader = VaderScorer()
        for split in scores:
            frame = splits[split]
            headlines, labels = list(frame.headline), list(frame.label)
            scores[split]["VADER"] = evaluate(labels, vader.score(headlines))
            print(f"zero-shot {split}", file=sys.stderr)
            scores[split]["SmolLM2 zero-shot"] = evaluate(labels, scorer.score(headlines))
        train = splits["train"]
        report = scorer.tune(
            list(train.headline),
            list(train.label),
            rank=args.rank,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
        )
        for split in scores:
            frame = splits[split]
            predicted = scorer.score(list(frame.headline))
            scores[split]["SmolLM2 + LoRA"] = evaluate(list(frame.label), predicted)
        after = {r.server_id: ray.get(r.handle.weights_digest.remote()) for r in swarm.servers()}
        tuned = scores["validation"]["SmolLM2 + LoRA"]
        card = scorer.save(
            "news-sentiment",
            args.hub,
            report=report,
            metrics={"validation_accuracy": tuned.accuracy, "validation_macro_f1": tuned.macro_f1},
        )
    finally:
        swarm.shutdown()
        ray.shutdown()
    config = client.adapter.config if client.adapter is not None else None
    results = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "minutes": (time.perf_counter() - begin) / 60,
        "sizes": {name: len(frame) for name, frame in splits.items()},
        "weights_unchanged": digests == after,
        "training": {
            **report.to_dict(),
            "rank": config.rank if config else None,
            "alpha": config.alpha if config else None,
            "targets": list(config.target_modules) if config else [],
            "lr": args.lr,
            "batch_size": args.batch_size,
            "adapter": f"{card.name} v{card.version}",
        },
        **{
            split: {name: report.to_dict() for name, report in by.items()}
            for split, by in scores.items()
        },
    }
    if not results["weights_unchanged"]:
        raise SystemExit("a server's weights changed during training")
    print(json.dumps(results, indent=2, default=str), flush=True)
    if args.write:
        update_results_section(args.write, SECTION, markdown(results))


if __name__ == "__main__":
    main()
