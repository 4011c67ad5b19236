"""A stateful pass through the swarm: servers keep KV caches, the client keeps the inputs.

Every hidden state a span was sent is kept on the client. When a server dies, times out or
loses the session, the span's blocks are re-routed (to a replica, a restarted server, or a
chain of servers with other boundaries) and the kept inputs are replayed to rebuild their
caches, after which the step carries on. Outputs are the same as without the failure.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from rayfin.errors import CacheFullError, LLMError, SessionError, SessionNotOpenError
from rayfin.llm.compression import WireTensor, decode, encode
from rayfin.llm.lora import AdapterPayload
from rayfin.llm.priority import Priority
from rayfin.llm.remote import SERVER_FAILURES, RemoteBlocks
from rayfin.llm.routing import Span

# Recoveries allowed for one step before giving up with an error instead of looping.
MAX_RECOVERIES_PER_STEP = 8


@dataclass(slots=True)
class _SpanState:
    span: Span
    handle: Any
    session_id: str
    history: list[WireTensor] = field(default_factory=list)


def _cause(exc: BaseException) -> BaseException:
    """The exception a server raised, unwrapped from Ray's task error."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        return exc.cause if exc.cause is not None else exc
    return exc


def _recoverable(exc: BaseException) -> bool:
    """The server failed, or it is fine but no longer holds the session."""
    return isinstance(exc, SERVER_FAILURES) or isinstance(_cause(exc), SessionNotOpenError)


class BlockSession:
    """Hidden states in, hidden states out, through every block, with caches on the servers."""

    def __init__(
        self,
        remote: RemoteBlocks,
        *,
        max_length: int,
        batch_size: int = 1,
        kv_bytes_per_token_block: int = 0,
        wait_for_cache_s: float | None = None,
        priority: Priority | None = None,
        adapter: Callable[[int, int], AdapterPayload | None] | None = None,
    ) -> None:
        self.remote = remote
        self.priority = priority
        # The adapter matrices for blocks [start, end): sent whole at every open (a
        # replacement server after a failover included), kept by the server per session.
        self.adapter = adapter
        self.max_length = max_length
        self.batch_size = batch_size
        self.wait_for_cache_s = wait_for_cache_s
        self._bytes_per_block = kv_bytes_per_token_block * max_length * batch_size
        self.position = 0
        self.recoveries = 0
        # Traffic of step() calls: hidden-state payload bytes sent and received, and hops.
        self.bytes_sent = 0
        self.bytes_received = 0
        self.hops = 0
        self.closed = False
        self._excluded: set[str] = set()
        self.spans: list[_SpanState] = self._open_chain(0, remote.num_blocks, history=[])

    @property
    def chain(self) -> list[Span]:
        return [state.span for state in self.spans]

    # -- opening and replay ------------------------------------------------------------

    def _open_chain(self, start: int, end: int, history: list[WireTensor]) -> list[_SpanState]:
        """Open sessions on a chain for ``[start, end)`` and replay ``history`` through it.

        Servers that fail or are full are excluded and the chain is planned again, until
        one works or no permitted server is left (then :class:`SwarmUnavailableError`).
        """
        while True:
            chain = self.remote.plan(
                start,
                end,
                exclude=self._excluded,
                cache_bytes_per_block=self._bytes_per_block,
                wait_for_cache_s=self.wait_for_cache_s,
            )
            states: list[_SpanState] = []
            try:
                inputs = history
                for span in chain:
                    state = _SpanState(span, self.remote.handle(span.server_id), uuid.uuid4().hex)
                    states.append(state)
                    self._open_on(state)
                    if inputs:
                        outputs = self.remote.call(
                            state.handle.replay.remote(state.session_id, inputs)
                        )
                        state.history = list(inputs)
                        inputs = outputs
                return states
            except SERVER_FAILURES:
                failed = states[-1].span.server_id
                self.remote.report_failure(failed)
            except ray.exceptions.RayTaskError as exc:
                # A server that filled up since the plan was made: try another one, or
                # report the full cache if no other server could take the session.
                failed = states[-1].span.server_id
                if not isinstance(_cause(exc), CacheFullError) or not self._alternatives(
                    failed, chain
                ):
                    self._close_states(states)
                    raise _cause(exc) from None
            self._excluded.add(failed)
            self._close_states(states)

    def _open_on(self, state: _SpanState) -> None:
        """Reserve the session's cache on ``state``'s server."""
        self.remote.call(
            state.handle.open.remote(
                state.session_id,
                state.span.start,
                state.span.end,
                self.batch_size,
                self.max_length,
                self.wait_for_cache_s,
                self.priority,
                self.adapter(state.span.start, state.span.end) if self.adapter else None,
            )
        )

    def _alternatives(self, server_id: str, chain: list[Span]) -> bool:
        """Whether any other permitted server could stand in for ``server_id``
        (the candidates are only the permitted servers)."""
        span = next(s for s in chain if s.server_id == server_id)
        return any(
            c.server_id != server_id
            and c.server_id not in self._excluded
            and c.start <= span.start < c.end
            for c in self.remote.candidates()
        )

    def _close_states(self, states: list[_SpanState]) -> None:
        for state in states:
            with contextlib.suppress(ray.exceptions.RayError):
                state.handle.close.remote(state.session_id)

    def _recover(self, index: int, exc: BaseException) -> None:
        """Replace span ``index`` after ``exc``: same server if only the session was lost,
        otherwise a new chain over the same blocks, rebuilt from the kept inputs."""
        self.recoveries += 1
        failed = self.spans[index]
        if isinstance(_cause(exc), SessionNotOpenError):
            # The server is fine but dropped the session (idle expiry): reopen it there.
            try:
                self._open_on(failed)
                if failed.history:
                    self.remote.call(failed.handle.replay.remote(failed.session_id, failed.history))
                return
            except (*SERVER_FAILURES, ray.exceptions.RayTaskError):
                pass
        self._excluded.add(failed.span.server_id)
        self.remote.report_failure(failed.span.server_id)
        self._close_states([failed])
        replacement = self._open_chain(failed.span.start, failed.span.end, failed.history)
        self.spans[index : index + 1] = replacement

    # -- stepping ------------------------------------------------------------------------

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run ``hidden`` ``[batch, new, dim]`` through every block; caches grow by ``new``."""
        (out,) = step_together([(self, hidden)])
        if isinstance(out, BaseException):
            raise out
        return out

    def _check_step(self, hidden: torch.Tensor) -> None:
        if self.closed:
            raise SessionError("this inference session is closed")
        if hidden.shape[0] != self.batch_size:
            raise SessionError(f"session batch is {self.batch_size}, got {hidden.shape[0]} rows")
        if self.position + hidden.shape[1] > self.max_length:
            raise SessionError(
                f"session would reach {self.position + hidden.shape[1]} tokens, past its "
                f"max_length {self.max_length}; open the session with a larger max_length"
            )

    def _record(self, state: _SpanState, sent: WireTensor, received: WireTensor) -> None:
        state.history.append(sent)
        self.bytes_sent += sent.nbytes
        self.bytes_received += received.nbytes
        self.hops += 1

    def close(self) -> None:
        """Free the caches on every server (best effort: a dead server has none to free)."""
        if self.closed:
            return
        self.closed = True
        refs = [state.handle.close.remote(state.session_id) for state in self.spans]
        deadline = time.monotonic() + 5.0
        ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> BlockSession:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclass(slots=True)
class _Progress:
    """One session's way through its chain within :func:`step_together`."""

    slot: int
    session: BlockSession
    length: int
    dtype: torch.dtype
    device: torch.device
    wire: WireTensor
    index: int = 0
    recoveries: int = 0


def step_together(
    steps: list[tuple[BlockSession, torch.Tensor]],
) -> list[torch.Tensor | BaseException]:
    """Step several sessions at once: each one's hidden states through all its blocks.

    Sessions whose next span is on the same server share one call to it, which the server
    runs as one batched forward; calls to different servers are in flight together. Each
    session fails over on its own (see :meth:`BlockSession._recover`), and the result list
    holds each session's output, or the error that ended its step.
    """
    results: list[torch.Tensor | BaseException | None] = [None] * len(steps)
    active: list[_Progress] = []
    for slot, (session, hidden) in enumerate(steps):
        try:
            session._check_step(hidden)
            wire = encode(hidden, session.remote.compression)
        except Exception as exc:
            results[slot] = exc
            continue
        active.append(_Progress(slot, session, hidden.shape[1], hidden.dtype, hidden.device, wire))
    while active:
        groups: dict[str, list[_Progress]] = {}
        for p in active:
            groups.setdefault(p.session.spans[p.index].span.server_id, []).append(p)
        # Every server's call goes out before any reply is awaited.
        calls = []
        for group in groups.values():
            entries = [
                (p.session.spans[p.index].session_id, p.wire, p.session.position) for p in group
            ]
            handle = group[0].session.spans[group[0].index].handle
            calls.append((group, handle.step.remote(entries)))
        for group, ref in calls:
            try:
                outputs: list[Any] = group[0].session.remote.call(ref)
            except (*SERVER_FAILURES, ray.exceptions.RayTaskError) as exc:
                outputs = [exc] * len(group)
            for p, out in zip(group, outputs, strict=True):
                if isinstance(out, BaseException):
                    _fail(p, out, results)
                else:
                    _advance(p, out, results)
        active = [p for p in active if results[p.slot] is None]
    return results  # type: ignore[return-value]


def _advance(p: _Progress, out: WireTensor, results: list[Any]) -> None:
    state = p.session.spans[p.index]
    p.session._record(state, p.wire, out)
    p.wire = out
    p.index += 1
    if p.index == len(p.session.spans):
        p.session.position += p.length
        results[p.slot] = decode(out, p.device).to(p.dtype)


def _fail(p: _Progress, exc: BaseException, results: list[Any]) -> None:
    """Recover the span that failed ``p``'s step, or end the step with an error."""
    p.recoveries += 1
    if not _recoverable(exc):
        results[p.slot] = _cause(exc)
        return
    if p.recoveries > MAX_RECOVERIES_PER_STEP:
        error = LLMError(
            f"gave up after {p.recoveries - 1} failovers in one step (last error: {exc})"
        )
        error.__cause__ = exc
        results[p.slot] = error
        return
    try:
        p.session._recover(p.index, exc)
    except Exception as error:
        results[p.slot] = error
