"""``/v1/generate`` and ``/v1/sentiment``: the distributed LLM behind the API.

:class:`LLMService` is a Serve deployment of its own (LLM calls take hundreds of
milliseconds, scoring a fraction of one, so they scale apart). It is a client of the
running swarm (:class:`rayfin.llm.client.DistributedCausalLM`: embeddings and LM head
here, blocks on the :class:`~rayfin.actors.block_server.BlockServer` actors), connected on
first use, so the API starts, and answers everything else, before any swarm exists.
Concurrent requests share the client, whose cohort steps their sessions together.
Sentiment is :class:`rayfin.sentiment.llm.LLMSentimentScorer`, with the configured tuned
adapter when there is one (then on a client of its own: adapters are per client).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rayfin.errors import PromptTooLongError, SwarmUnavailableError
from rayfin.serve.schemas import (
    DEFAULT_NEW_TOKENS,
    GenerateRequest,
    GenerateResult,
    SentimentResult,
    SentimentScore,
)

if TYPE_CHECKING:
    from rayfin.llm.client import DistributedCausalLM
    from rayfin.sentiment.llm import LLMSentimentScorer

CONNECT_TIMEOUT_S = 10.0
"""How long the first request waits for the swarm's servers to cover every block."""


@dataclass(frozen=True)
class LLMOptions:
    model: str
    swarm: str = "default"
    adapter: str | None = None  # NAME[@VERSION] in the adapter hub
    hub: str | None = None
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 256


class LLMService:
    """Generation and headline sentiment on the swarm (see the module docstring)."""

    def __init__(self, options: LLMOptions) -> None:
        self.options = options
        self._client: DistributedCausalLM | None = None
        self._scorer: LLMSentimentScorer | None = None
        self._lock = threading.Lock()
        self._generated = 0
        self._generate_s = 0.0
        self._headlines = 0
        self._metrics = _LLMMetrics.create()

    # -- connections -------------------------------------------------------------------------

    def _check_swarm(self) -> None:
        from rayfin.llm.swarm import find_registry

        if find_registry(self.options.swarm) is None:
            raise SwarmUnavailableError(
                f"no LLM swarm named {self.options.swarm!r} is running: start one with "
                f"`rayfin llm serve {self.options.model}`"
            )

    def client(self) -> DistributedCausalLM:
        """The generation client, connected on first use."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    from rayfin.llm.client import DistributedCausalLM

                    self._check_swarm()
                    self._client = DistributedCausalLM.from_pretrained(
                        self.options.model,
                        swarm=self.options.swarm,
                        wait_for_servers_s=CONNECT_TIMEOUT_S,
                    )
        return self._client

    def scorer(self) -> LLMSentimentScorer:
        """The sentiment scorer: the generation client, or one with the tuned adapter."""
        if self._scorer is None:
            from rayfin.sentiment.llm import LLMSentimentScorer

            if self.options.adapter is None:
                scorer = LLMSentimentScorer(self.client())
            else:
                self._check_swarm()
                name, _, version = self.options.adapter.partition("@")
                scorer = LLMSentimentScorer.from_options(
                    self.options.model,
                    swarm=self.options.swarm,
                    adapter=name,
                    version=(int(version) if version.isdigit() else version) or None,
                    hub=self.options.hub,
                )
            with self._lock:
                self._scorer = self._scorer or scorer
        return self._scorer

    # -- requests ----------------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> GenerateResult:
        import torch

        options = self.options
        new_tokens = request.max_new_tokens or min(DEFAULT_NEW_TOKENS, options.max_new_tokens)
        if new_tokens > options.max_new_tokens:
            raise PromptTooLongError(new_tokens, options.max_new_tokens, "max_new_tokens")
        client = self.client()
        tokenizer = client.tokenizer
        if request.chat and getattr(tokenizer, "chat_template", None):
            from rayfin.llm.chat import chat_input_ids

            ids = chat_input_ids(tokenizer, request.prompt)
        else:
            ids = tokenizer(request.prompt, return_tensors="pt")["input_ids"]
        prompt_tokens = int(ids.shape[1])
        if prompt_tokens > options.max_prompt_tokens:
            raise PromptTooLongError(prompt_tokens, options.max_prompt_tokens)
        room = client.shape.max_length - new_tokens
        if prompt_tokens > room:
            raise PromptTooLongError(prompt_tokens, room, "prompt plus max_new_tokens")
        start = time.perf_counter()
        with torch.no_grad():
            out = client.generate(
                ids,
                max_new_tokens=new_tokens,
                do_sample=request.temperature > 0,
                temperature=request.temperature or 1.0,
                top_p=request.top_p,
                seed=request.seed,
            )
        seconds = time.perf_counter() - start
        new = out[0, prompt_tokens:]
        eos = client.generation_defaults.get("eos_token_id")
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        stopped = bool(eos_ids) and any(int(t) in eos_ids for t in new.tolist())
        if stopped:  # drop the EOS and the padding after it
            first = next(i for i, t in enumerate(new.tolist()) if t in eos_ids)
            new = new[:first]
        count = int(new.shape[0]) + (1 if stopped else 0)
        self._record_generation(count, seconds)
        return GenerateResult(
            text=tokenizer.decode(new, skip_special_tokens=True).strip(),
            prompt_tokens=prompt_tokens,
            new_tokens=count,
            seconds=round(seconds, 4),
            tokens_per_s=round(count / seconds, 2) if seconds > 0 else 0.0,
            finish_reason="stop" if stopped else "length",
        )

    def sentiment(self, headlines: list[str]) -> SentimentResult:
        from rayfin.sentiment.scoring import polarity

        scorer = self.scorer()
        probs = scorer.score(headlines)
        self._headlines += len(headlines)
        if self._metrics is not None:
            self._metrics.headlines.inc(len(headlines))
        which = self.options.adapter or "zero-shot"
        return SentimentResult(
            scorer=f"{self.options.model} {which}",
            scores=[
                SentimentScore(
                    headline=h,
                    negative=float(p[0]),
                    neutral=float(p[1]),
                    positive=float(p[2]),
                    sentiment=float(s),
                )
                for h, p, s in zip(headlines, probs, polarity(probs), strict=True)
            ],
        )

    def health(self) -> tuple[str, str]:
        """("ok" | "absent", what): whether the swarm runs, and whether we use it yet."""
        try:
            self._check_swarm()
        except SwarmUnavailableError as exc:
            return "absent", str(exc)
        state = "connected" if self._client is not None else "connects on first use"
        return "ok", f"swarm {self.options.swarm!r} ({self.options.model}), {state}"

    def stats(self) -> dict[str, Any]:
        """Tokens generated, their rate while generating, and headlines scored."""
        return {
            "connected": self._client is not None,
            "swarm": self.options.swarm,
            "generated_tokens": self._generated,
            "tokens_per_s": round(self._generated / self._generate_s, 2)
            if self._generate_s
            else 0.0,
            "headlines": self._headlines,
        }

    def _record_generation(self, tokens: int, seconds: float) -> None:
        with self._lock:
            self._generated += tokens
            self._generate_s += seconds
        if self._metrics is not None:
            self._metrics.tokens.inc(tokens)
            self._metrics.latency.observe(seconds)
            if seconds > 0:
                self._metrics.rate.set(tokens / seconds)


@dataclass
class _LLMMetrics:
    tokens: Any
    rate: Any
    latency: Any
    headlines: Any

    @classmethod
    def create(cls) -> _LLMMetrics | None:
        import ray

        if not ray.is_initialized():
            return None
        from ray.util import metrics

        return cls(
            tokens=metrics.Counter(
                "rayfin_llm_generated_tokens",
                description="Tokens generated through the HTTP API.",
            ),
            rate=metrics.Gauge(
                "rayfin_llm_tokens_per_second",
                description="Tokens per second of the last /v1/generate request.",
            ),
            latency=metrics.Histogram(
                "rayfin_llm_generate_seconds",
                description="Seconds one /v1/generate request took.",
                boundaries=[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            ),
            headlines=metrics.Counter(
                "rayfin_llm_headlines_scored",
                description="Headlines scored for sentiment through the HTTP API.",
            ),
        )
