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
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from rayfin.errors import CacheFullError, LLMError, SessionError, SessionNotOpenError
from rayfin.llm.compression import WireTensor, decode, encode
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
    ) -> None:
        self.remote = remote
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
        if self.closed:
            raise SessionError("this inference session is closed")
        if hidden.shape[0] != self.batch_size:
            raise SessionError(f"session batch is {self.batch_size}, got {hidden.shape[0]} rows")
        length = hidden.shape[1]
        if self.position + length > self.max_length:
            raise SessionError(
                f"session would reach {self.position + length} tokens, past its max_length "
                f"{self.max_length}; open the session with a larger max_length"
            )
        dtype, device = hidden.dtype, hidden.device
        wire = encode(hidden, self.remote.compression)
        index, recoveries = 0, 0
        failure: BaseException | None = None
        # Span by span; each server's output wire goes on to the next server as it came.
        while index < len(self.spans):
            if failure is None:
                state = self.spans[index]
                try:
                    out = self.remote.call(
                        state.handle.step.remote(state.session_id, wire, self.position)
                    )
                except (*SERVER_FAILURES, ray.exceptions.RayTaskError) as exc:
                    failure = exc
                else:
                    self._record(state, wire, out)
                    wire = out
                    index += 1
                    continue
            recoveries += 1
            if not _recoverable(failure):
                raise _cause(failure) from None
            if recoveries > MAX_RECOVERIES_PER_STEP:
                raise LLMError(
                    f"gave up after {recoveries - 1} failovers in one step (last error: {failure})"
                ) from failure
            self._recover(index, failure)
            failure = None
        self.position += length
        return decode(wire, device).to(dtype)

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
