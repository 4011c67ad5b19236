"""``DistributedCausalLM``: a causal LM whose blocks run on a swarm of Ray actors.

The client holds the token embeddings, the final norm and the LM head, and sends hidden
states through a chain of block servers. It offers what a transformers model does for
inference: ``model(input_ids).logits``, ``generate(...)``, plus explicit sessions, and it
trains client-held adapters (:meth:`DistributedCausalLM.add_lora`,
:meth:`~DistributedCausalLM.add_prompt_tuning`, :meth:`~DistributedCausalLM.train_adapter`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rayfin.errors import LLMError, SessionError
from rayfin.llm.backprop import RemoteBackprop
from rayfin.llm.checkpoint import load_client_parts, load_config, model_shape
from rayfin.llm.cohort import StepCohort
from rayfin.llm.finetune import hidden_states, prepend_prefix
from rayfin.llm.generation import SamplingOptions, StopState, TokenSelector
from rayfin.llm.loading import resolve_model_path
from rayfin.llm.lora import LoraAdapter, LoraConfig
from rayfin.llm.priority import INFERENCE, Priority
from rayfin.llm.remote import ClientOptions, RemoteBlocks
from rayfin.llm.session import BlockSession, step_together

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from rayfin.llm.finetune import ClassificationHead, PromptPrefix, TrainingReport
    from rayfin.llm.hub import AdapterCard, AdapterHub
    from rayfin.llm.swarm import Swarm


@dataclass(frozen=True, slots=True)
class CausalLMOutput:
    """What ``model(input_ids)`` returns, shaped like transformers' output."""

    logits: torch.Tensor


class InferenceSession:
    """Token ids in, logits out, one step at a time, with caches kept on the servers."""

    def __init__(
        self,
        model: DistributedCausalLM,
        blocks: BlockSession,
        prefix: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.blocks = blocks
        # The prompt-tuning prefix fed before the first tokens (the adapter's matrices went
        # to the servers at open): the session keeps the adapter it was opened with.
        self.prefix = prefix
        # The last token generate() chose but did not feed yet; a continued generate()
        # feeds it first, so consecutive calls chain like one long generation.
        self.unfed = torch.zeros(blocks.batch_size, 0, dtype=torch.long)

    @property
    def position(self) -> int:
        """Tokens processed so far."""
        return self.blocks.position

    @property
    def max_length(self) -> int:
        return self.blocks.max_length

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, new, vocab]`` for ``input_ids`` ``[batch, new]``.

        Steps of the model's other sessions running at the same time (from other threads)
        are computed together with this one.
        """
        return self.model._cohort.step(self, (self, input_ids))

    def close(self) -> None:
        self.model._cohort.forget(self)
        self.blocks.close()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class DistributedCausalLM:
    """A causal LM served by the swarm ``swarm``; see :meth:`from_pretrained`."""

    def __init__(
        self,
        config: PretrainedConfig,
        embed_tokens: torch.nn.Embedding,
        norm: torch.nn.Module,
        lm_head: torch.nn.Linear,
        remote: RemoteBlocks,
        *,
        generation_defaults: dict[str, Any] | None = None,
        path: str | None = None,
    ) -> None:
        self.config = config
        self.path = path
        self.shape = model_shape(config)
        self.embed_tokens = embed_tokens
        self.norm = norm
        self.lm_head = lm_head
        self.remote = remote
        self.generation_defaults = generation_defaults or {}
        self._cohort = StepCohort(self._step_sessions)
        self.backprop = RemoteBackprop(remote)
        # Client-held trainable parts: the servers only ever see them per request.
        self.adapter: LoraAdapter | None = None
        self.prompt_prefix: PromptPrefix | None = None
        self.head: ClassificationHead | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        swarm: str | Swarm = "default",
        dtype: torch.dtype = torch.float32,
        allowlist: Iterable[str] | None = None,
        blocklist: Iterable[str] = (),
        step_timeout_s: float = 60.0,
        wait_for_servers_s: float = 30.0,
    ) -> DistributedCausalLM:
        """Load the client's parts of ``name_or_path`` and attach to the swarm by name.

        ``allowlist`` restricts routing to the named servers; ``blocklist`` excludes
        servers. A server that does not answer within ``step_timeout_s`` counts as failed.
        """
        path = resolve_model_path(name_or_path)
        config = load_config(path)
        embed, norm, head = load_client_parts(path, config, dtype)
        options = ClientOptions(
            allowlist=None if allowlist is None else frozenset(allowlist),
            blocklist=frozenset(blocklist),
            step_timeout_s=step_timeout_s,
            wait_for_servers_s=wait_for_servers_s,
        )
        name = swarm if isinstance(swarm, str) else swarm.name
        remote = RemoteBlocks(name, config.num_hidden_layers, options)
        return cls(
            config,
            embed,
            norm,
            head,
            remote,
            generation_defaults=_generation_defaults(path),
            path=str(path),
        )

    # -- the local parts -----------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer, loaded on first use."""
        if self._tokenizer is None:
            if self.path is None:
                raise LLMError("this model was built without a path; set model._tokenizer")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    # -- adapters (client-held) -------------------------------------------------------------

    def add_lora(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        target_modules: tuple[str, ...] | list[str] = ("q_proj", "v_proj"),
        *,
        seed: int = 0,
    ) -> LoraAdapter:
        """Attach a new LoRA adapter (on the client) to every block's ``target_modules``
        (any of ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``); forwards and
        training use it from now on. Returns it: its parameters are ordinary torch ones."""
        config = LoraConfig(rank, float(alpha), tuple(target_modules))
        self.adapter = LoraAdapter(config, self.config, seed=seed, dtype=self.dtype)
        return self.adapter

    def add_prompt_tuning(self, num_virtual_tokens: int = 16, *, seed: int = 0) -> PromptPrefix:
        """Attach a trainable prefix of ``num_virtual_tokens`` input embeddings."""
        from rayfin.llm.finetune import PromptPrefix

        self.prompt_prefix = PromptPrefix(self.embed_tokens, num_virtual_tokens, seed=seed)
        return self.prompt_prefix

    def remove_adapters(self) -> None:
        """Back to the base model; tells the servers to drop cached matrices."""
        self.adapter = None
        self.prompt_prefix = None
        self.head = None
        self.backprop.release()

    def save_adapter(
        self,
        name: str,
        hub: AdapterHub | str | None = None,
        *,
        task: str = "causal-lm",
        labels: tuple[str, ...] | list[str] | None = None,
        metrics: dict[str, float] | None = None,
        training_data_fingerprint: str = "",
        extra: dict[str, Any] | None = None,
    ) -> AdapterCard:
        """Save the attached LoRA adapter and/or prefix (and classification head) as the
        next version of ``name`` in ``hub`` (a path, or the default hub)."""
        from rayfin.llm.hub import AdapterHub

        if self.adapter is None and self.prompt_prefix is None:
            raise LLMError("no adapter to save: call add_lora(...) or add_prompt_tuning(...)")
        if self.path is None:
            raise LLMError("this model was built without a path, so its base hash is unknown")
        hub = hub if isinstance(hub, AdapterHub) else AdapterHub(hub)
        tensors: dict[str, torch.Tensor] = {}
        options: dict[str, Any] = {}
        if self.adapter is not None:
            tensors.update(self.adapter.state_tensors())
            config = self.adapter.config
            options |= {
                "rank": config.rank,
                "alpha": config.alpha,
                "target_modules": config.target_modules,
            }
        if self.prompt_prefix is not None:
            tensors["prompt.embeddings"] = self.prompt_prefix.embeddings.detach().cpu().clone()
            options["num_virtual_tokens"] = self.prompt_prefix.num_virtual_tokens
        if self.head is not None:
            tensors["head.weight"] = self.head.linear.weight.detach().cpu().clone()
            tensors["head.bias"] = self.head.linear.bias.detach().cpu().clone()
            labels = labels or self.head.labels
        return hub.save(
            name,
            tensors,
            kind="lora" if self.adapter is not None else "prompt",
            base_model=self.path,
            task=task,
            labels=labels,
            training_data_fingerprint=training_data_fingerprint,
            metrics=metrics,
            extra=extra,
            **options,
        )

    def load_adapter(
        self, name: str, version: int | str | None = None, hub: AdapterHub | str | None = None
    ) -> AdapterCard:
        """Attach adapter ``name`` (``version``: a number, an alias, or the latest) from
        ``hub``, refusing one trained on another base model."""
        from rayfin.llm.finetune import ClassificationHead, PromptPrefix
        from rayfin.llm.hub import AdapterHub, base_model_hash

        if self.path is None:
            raise LLMError("this model was built without a path, so its base hash is unknown")
        hub = hub if isinstance(hub, AdapterHub) else AdapterHub(hub)
        tensors, card = hub.load(name, version, base_model_hash=base_model_hash(self.path))
        self.remove_adapters()
        lora = {k: v for k, v in tensors.items() if k.startswith("blocks.")}
        if lora:
            assert card.rank is not None
            assert card.alpha is not None
            self.add_lora(card.rank, card.alpha, card.target_modules)
            assert self.adapter is not None
            self.adapter.load_tensors(lora)
        if "prompt.embeddings" in tensors:
            prefix = tensors["prompt.embeddings"]
            self.prompt_prefix = PromptPrefix(self.embed_tokens, prefix.shape[0])
            with torch.no_grad():
                self.prompt_prefix.embeddings.copy_(prefix)
        if "head.weight" in tensors:
            weight = tensors["head.weight"]
            self.head = ClassificationHead(weight.shape[1], card.labels or ())
            with torch.no_grad():
                self.head.linear.weight.copy_(weight)
                self.head.linear.bias.copy_(tensors["head.bias"])
        return card

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params: list[torch.nn.Parameter] = []
        for part in (self.adapter, self.prompt_prefix):
            if part is not None:
                params += list(part.parameters())
        return params

    def train_adapter(
        self, dataset: Any, epochs: int = 1, lr: float = 1e-3, **options: Any
    ) -> TrainingReport:
        """Train the attached adapter and/or prefix; see :func:`rayfin.llm.finetune.train_adapter`
        for ``task`` (causal-lm, label-scoring, classification) and the other options."""
        from rayfin.llm.finetune import train_adapter

        return train_adapter(self, dataset, epochs=epochs, lr=lr, **options)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.embed_tokens(input_ids)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head over ``hidden`` ``[..., dim]``."""
        with torch.no_grad():
            return self.lm_head(self.norm(hidden))

    def _step_sessions(
        self, steps: list[tuple[InferenceSession, torch.Tensor]]
    ) -> list[torch.Tensor | BaseException]:
        """One step of each session: embeddings, every block (one call per server for
        all of them), then one LM head pass over all their rows."""
        hidden: list[torch.Tensor | BaseException] = []
        virtual: list[int] = []
        for session, input_ids in steps:
            try:
                embeds = self.embed(input_ids)
                first = session.prefix is not None and session.position == 0
                if first:
                    embeds = prepend_prefix(session.prefix, embeds)
                virtual.append(session.prefix.shape[0] if first else 0)
                hidden.append(embeds)
            except Exception as exc:
                virtual.append(0)
                hidden.append(exc)
        outputs = step_together(
            [
                (session.blocks, h)
                for (session, _), h in zip(steps, hidden, strict=True)
                if isinstance(h, torch.Tensor)
            ]
        )
        ordered = iter(outputs)
        states = [h if isinstance(h, BaseException) else next(ordered) for h in hidden]
        # The prefix's positions give no logits.
        states = [
            s[:, v:] if isinstance(s, torch.Tensor) and v else s
            for s, v in zip(states, virtual, strict=True)
        ]
        ready = [o for o in states if isinstance(o, torch.Tensor)]
        if not ready:
            return states
        rows = torch.cat([o.reshape(-1, o.shape[-1]) for o in ready])
        logits = iter(self.lm_logits(rows).split([o.shape[0] * o.shape[1] for o in ready]))
        return [
            o if isinstance(o, BaseException) else next(logits).reshape(*o.shape[:-1], -1)
            for o in states
        ]

    # -- inference -------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        priority: Priority = INFERENCE,
    ) -> CausalLMOutput:
        """Logits for every position of ``input_ids`` ``[batch, length]`` (no caches kept),
        with the attached adapter and prefix, if any."""
        input_ids = _as_batch(input_ids)
        _check_unpadded(attention_mask)
        prefix = self.prompt_prefix
        virtual = prefix.num_virtual_tokens if prefix is not None else 0
        self._check_length(input_ids.shape[1] + virtual)
        with torch.no_grad():
            hidden = hidden_states(self, input_ids, priority=priority)  # final norm applied
            return CausalLMOutput(logits=self.lm_head(hidden))

    __call__ = forward

    def inference_session(
        self,
        max_length: int,
        *,
        batch_size: int = 1,
        wait_for_cache_s: float | None = None,
        priority: Priority | None = None,
    ) -> InferenceSession:
        """Open a session of up to ``max_length`` tokens on a chain of servers.

        When the chosen servers' caches are full this raises :class:`CacheFullError`,
        or first waits up to ``wait_for_cache_s`` seconds for room. ``priority`` (a bid
        paid once per server at open) moves the session's steps ahead in the queues.
        """
        prefix = self.prompt_prefix
        if prefix is not None:
            max_length += prefix.num_virtual_tokens
        self._check_length(max_length)
        element = torch.empty((), dtype=self.dtype).element_size()
        adapter = self.adapter
        blocks = BlockSession(
            self.remote,
            max_length=max_length,
            batch_size=batch_size,
            kv_bytes_per_token_block=self.shape.kv_bytes_per_token(1, element),
            wait_for_cache_s=wait_for_cache_s,
            priority=priority,
            adapter=None if adapter is None else functools.partial(self.backprop.payload, adapter),
        )
        snapshot = None if prefix is None else prefix.embeddings.detach().clone()
        return InferenceSession(self, blocks, snapshot)

    def _check_length(self, length: int) -> None:
        if length > self.shape.max_length:
            raise SessionError(
                f"{length} tokens exceed the model's {self.shape.max_length} positions; "
                "shorten the prompt or max_new_tokens"
            )

    def generate(
        self,
        input_ids: torch.Tensor | Sequence[int] | None = None,
        *,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        stop_strings: str | Sequence[str] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        attention_mask: torch.Tensor | None = None,
        session: InferenceSession | None = None,
    ) -> torch.Tensor:
        """Generate like transformers' ``generate``: returns prompt plus new tokens.

        Greedy by default; ``do_sample=True`` samples with ``temperature``, ``top_k`` and
        ``top_p``, reproducibly when ``seed`` is given. Rows stop at ``eos_token_id``
        (default: the model's) or a ``stop_strings`` match (needs ``tokenizer``); finished
        rows are padded with ``pad_token_id``. With ``session``, generation continues it:
        ``input_ids`` are only the new tokens (may be empty).
        """
        _check_unpadded(attention_mask)
        ids = _as_batch(input_ids if input_ids is not None else torch.zeros(1, 0, dtype=torch.long))
        if ids.shape[1] == 0 and (session is None or session.unfed.shape[1] == 0):
            raise ValueError("generate needs input_ids (or a session it generated with before)")
        if max_new_tokens is None:
            max_new_tokens = (
                max_length - ids.shape[1]
                if max_length is not None
                else int(self.generation_defaults.get("max_new_tokens") or 20)
            )
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must not be negative, got {max_new_tokens}")
        if eos_token_id is None:
            eos_token_id = self.generation_defaults.get("eos_token_id")
        eos = frozenset([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
        if pad_token_id is None:
            pad_token_id = self.generation_defaults.get("pad_token_id")
        if pad_token_id is None:
            pad_token_id = min(eos) if eos else 0
        stops = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings or ())
        selector = TokenSelector(SamplingOptions(do_sample, temperature, top_k, top_p, seed))
        stop = StopState(eos, stops, tokenizer)
        stop.start(ids.shape[0])

        own_session = session is None
        if own_session:
            session = self.inference_session(ids.shape[1] + max_new_tokens, batch_size=ids.shape[0])
        else:
            # The last token chosen is not fed to the servers, so it needs no room.
            needed = session.unfed.shape[1] + ids.shape[1] + max_new_tokens - 1
            if session.position + needed > session.max_length:
                raise SessionError(
                    f"the session has room for {session.max_length - session.position} more "
                    f"tokens; this call needs {needed}"
                )
        assert session is not None
        generated = torch.zeros(ids.shape[0], 0, dtype=torch.long)
        try:
            pending = torch.cat([session.unfed, ids], dim=1)
            for _ in range(max_new_tokens):
                logits = session.step(pending)[:, -1, :]
                tokens = selector(logits)
                tokens = torch.where(stop.finished, torch.full_like(tokens, pad_token_id), tokens)
                generated = torch.cat([generated, tokens[:, None]], dim=1)
                stop.update(tokens, generated)
                if stop.all_done:
                    break
                pending = tokens[:, None]
            session.unfed = generated[:, -1:] if generated.shape[1] else pending
        finally:
            if own_session:
                session.close()
        return torch.cat([ids, generated], dim=1)


def _as_batch(input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    return ids[None, :] if ids.dim() == 1 else ids


def _check_unpadded(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None and not bool(torch.as_tensor(attention_mask).all()):
        raise ValueError(
            "padded batches are not supported: pass prompts of equal length, or one at a time"
        )


def _generation_defaults(path: str) -> dict[str, Any]:
    """EOS, pad and length defaults from the model's generation config, if it has one."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(path)
    except OSError:
        return {}
    return {
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "max_new_tokens": config.max_new_tokens,
    }
