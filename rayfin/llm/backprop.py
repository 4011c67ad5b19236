"""Stateless passes through the swarm, forward and backward, for scoring and training.

A forward plans a chain, sends the hidden state through it and keeps, per span, exactly
what it sent (:class:`Hop`). A backward walks the hops in reverse: each server recomputes
its span's forward from the kept input, with the request's LoRA matrices, and returns the
input's gradient and the matrices' gradients (:meth:`BlockServer.backward`). Nothing lives
on a server between the two, so when a server fails either way the span is re-routed (to
a replica, or a chain with other boundaries, whose inner inputs are recomputed first) and
the pass carries on with the same numbers.

:func:`remote_blocks` wraps both in a ``torch.autograd.Function``, so the swarm is one
differentiable layer between the client's embeddings and its head.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
import torch

from rayfin.errors import AdapterNotCachedError
from rayfin.llm.compression import WireTensor, decode, encode
from rayfin.llm.lora import AdapterPayload, LoraAdapter, digest, tensors_bytes
from rayfin.llm.priority import INFERENCE, Priority
from rayfin.llm.remote import SERVER_FAILURES, RemoteBlocks
from rayfin.llm.routing import Span


@dataclass(frozen=True, slots=True)
class Hop:
    """What one span of a forward was sent: its backward recomputes from this."""

    span: Span
    wire: WireTensor


class _ServerFailed(Exception):
    def __init__(self, server_id: str) -> None:
        super().__init__(server_id)
        self.server_id = server_id


def _cause(exc: BaseException) -> BaseException:
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        return exc.cause
    return exc


class RemoteBackprop:
    """The stateless path through ``remote``'s swarm, with traffic counters.

    ``bytes_sent`` / ``bytes_received`` count hidden states, gradients and adapter
    matrices, so a training step's network cost can be read off.
    """

    def __init__(self, remote: RemoteBlocks, *, key: str | None = None) -> None:
        self.remote = remote
        # Names this client's adapters in servers' caches; unique per client.
        self.key = key or uuid.uuid4().hex
        self.bytes_sent = 0
        self.bytes_received = 0
        self.recoveries = 0
        # (server, cache key) -> digest the server was last sent: send a reference next.
        self._sent: dict[tuple[str, str], str] = {}

    # -- adapters on the wire ------------------------------------------------------------

    def payload(self, adapter: LoraAdapter | None, start: int, end: int) -> AdapterPayload | None:
        """``adapter``'s matrices for blocks ``[start, end)``, as a request carries them."""
        if adapter is None:
            return None
        tensors = {
            n: p.detach().cpu().contiguous() for n, p in adapter.span_tensors(start, end).items()
        }
        if not tensors:
            return None
        key = f"{self.key}/{id(adapter):x}/{start}-{end}"
        return AdapterPayload(key, digest(tensors), adapter.scaling, tensors)

    def _call(
        self,
        span: Span,
        method: str,
        payload: AdapterPayload | None,
        priority: Priority,
        *args: Any,
    ) -> Any:
        """Call ``method`` on ``span``'s server with the adapter, by reference when the
        server was sent that content before; server failures become :class:`_ServerFailed`."""
        try:
            handle = self.remote.handle(span.server_id)
        except KeyError:
            raise _ServerFailed(span.server_id) from None
        key = (span.server_id, payload.key) if payload is not None else None
        send = payload
        if payload is not None and self._sent.get(key) == payload.digest:  # type: ignore[arg-type]
            send = payload.without_tensors()
        while True:
            if send is not None and send.tensors is not None:
                self.bytes_sent += tensors_bytes(send.tensors)
            call = getattr(handle, method).remote(*args, span.start, span.end, send, priority)
            try:
                result = self.remote.call(call)
            except SERVER_FAILURES:
                if key is not None:
                    self._sent.pop(key, None)
                raise _ServerFailed(span.server_id) from None
            except ray.exceptions.RayTaskError as exc:
                cause = _cause(exc)
                if isinstance(cause, AdapterNotCachedError) and send is not payload:
                    send = payload  # evicted, or the server restarted: send the matrices
                    continue
                raise cause from None
            if key is not None:
                self._sent[key] = payload.digest  # type: ignore[union-attr]
            return result

    def release(self) -> None:
        """Ask every server this client sent adapter matrices to forget them."""
        for server_id, key in list(self._sent):
            try:
                handle = self.remote.handle(server_id)
            except KeyError:
                continue
            handle.release_adapter.remote(key)  # fire and forget: a cache entry, not state
        self._sent.clear()

    # -- forward -----------------------------------------------------------------------

    def forward(
        self,
        hidden: torch.Tensor,
        adapter: LoraAdapter | None = None,
        *,
        priority: Priority = INFERENCE,
    ) -> tuple[torch.Tensor, list[Hop]]:
        """Every block over ``hidden`` (no caches), routing around failed servers; returns
        the output and the hops a backward needs."""
        compression = self.remote.compression
        excluded: set[str] = set()
        hops: list[Hop] = []
        position = 0
        while position < self.remote.num_blocks:
            chain = self.remote.plan(position, self.remote.num_blocks, exclude=excluded)
            for span in chain:
                wire = encode(hidden, compression)
                try:
                    out = self._call(
                        span, "forward", self.payload(adapter, span.start, span.end), priority, wire
                    )
                except _ServerFailed as failed:
                    self._failed(failed.server_id, excluded)
                    break
                self.bytes_sent += wire.nbytes
                self.bytes_received += out.nbytes
                hops.append(Hop(span, wire))
                hidden = decode(out, hidden.device).to(hidden.dtype)
                position = span.end
        return hidden, hops

    def _failed(self, server_id: str, excluded: set[str]) -> None:
        excluded.add(server_id)
        self.remote.report_failure(server_id)
        self.recoveries += 1

    # -- backward ----------------------------------------------------------------------

    def backward(
        self,
        hops: list[Hop],
        grad: torch.Tensor,
        adapter: LoraAdapter | None = None,
        *,
        priority: Priority = INFERENCE,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Gradients for the forward that made ``hops``: of its input, and of ``adapter``'s
        matrices by name."""
        grads: dict[str, torch.Tensor] = {}
        dtype, device = grad.dtype, grad.device
        for hop in reversed(hops):
            grad = self._backward_span(hop, grad, adapter, priority, grads)
        return grad.to(device, dtype), grads

    def _backward_span(
        self,
        hop: Hop,
        grad: torch.Tensor,
        adapter: LoraAdapter | None,
        priority: Priority,
        grads: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        excluded: set[str] = set()
        chain = [hop.span]
        while True:
            try:
                return self._backward_chain(chain, hop.wire, grad, adapter, priority, grads)
            except _ServerFailed as failed:
                self._failed(failed.server_id, excluded)
            chain = self.remote.plan(hop.span.start, hop.span.end, exclude=excluded)

    def _backward_chain(
        self,
        chain: list[Span],
        wire: WireTensor,
        grad: torch.Tensor,
        adapter: LoraAdapter | None,
        priority: Priority,
        grads: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Backward over ``chain`` (one span, or a re-routed range split differently, whose
        inner inputs are recomputed by forwards first)."""
        compression = self.remote.compression
        inputs = [wire]
        for span in chain[:-1]:
            out = self._call(
                span, "forward", self.payload(adapter, span.start, span.end), priority, inputs[-1]
            )
            self.bytes_sent += inputs[-1].nbytes
            self.bytes_received += out.nbytes
            inputs.append(encode(decode(out), compression))
        for span, sent in zip(reversed(chain), reversed(inputs), strict=True):
            grad_wire = encode(grad, compression)
            grad_in, span_grads = self._call(
                span,
                "backward",
                self.payload(adapter, span.start, span.end),
                priority,
                sent,
                grad_wire,
            )
            self.bytes_sent += sent.nbytes + grad_wire.nbytes
            self.bytes_received += grad_in.nbytes + tensors_bytes(span_grads)
            grads.update(span_grads)
            grad = decode(grad_in)
        return grad


class _SwarmFunction(torch.autograd.Function):
    """``hidden -> blocks(hidden)`` through the swarm, differentiable in ``hidden`` and in
    the adapter's matrices (passed as trailing inputs so autograd tracks them)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        backprop: RemoteBackprop,
        adapter: LoraAdapter | None,
        priority: Priority,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        out, hops = backprop.forward(hidden.detach(), adapter, priority=priority)
        ctx.backprop, ctx.adapter, ctx.priority, ctx.hops = backprop, adapter, priority, hops
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_in, grads = ctx.backprop.backward(
            ctx.hops, grad.contiguous(), ctx.adapter, priority=ctx.priority
        )
        names = list(ctx.adapter.named_tensors()) if ctx.adapter is not None else []
        return (grad_in, None, None, None, *(grads.get(name) for name in names))


def remote_blocks(
    backprop: RemoteBackprop,
    hidden: torch.Tensor,
    adapter: LoraAdapter | None = None,
    *,
    priority: Priority = INFERENCE,
) -> torch.Tensor:
    """Every block of the swarm over ``hidden``, as a differentiable op."""
    params: Iterator[torch.Tensor] = iter(adapter.named_tensors().values()) if adapter else iter(())
    return _SwarmFunction.apply(hidden, backprop, adapter, priority, *params)
