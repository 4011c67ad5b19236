"""``BlockServer``: a Ray actor that serves a contiguous range of a causal LM's blocks.

It is an async actor: requests arrive on the event loop while compute runs on one worker
thread, so decode steps that arrive while a batch is computing queue up and run together
as the next batched forward. A lone session pays no batching delay.

The queue is ordered by :class:`~rayfin.llm.priority.Priority`: inference before training,
then higher bids (paid from the client's points account before queueing; see
:mod:`rayfin.llm.points`). The server counts the work it computes, never what a client
claims, and its operator earns points for it. Training requests
(:meth:`BlockServer.forward` with an adapter, :meth:`BlockServer.backward`) apply the LoRA
matrices the client sent for that request only (:mod:`rayfin.llm.lora`), and the server's
weights never change (:meth:`BlockServer.weights_digest`).

Every second the server exports its KV cache use, the tokens its blocks processed and the
seconds each compute took to Prometheus through Ray's metrics (``ray_rayfin_llm_kv_cache_*``,
``ray_rayfin_llm_server_*``, labelled with the server id): the figures its
:class:`~rayfin.llm.server_info.ServerInfo` reports, so nothing extra is counted per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import ray
import torch

from rayfin.actors.points import WorkMeter
from rayfin.errors import SessionError
from rayfin.llm.adapter_cache import AdapterCache
from rayfin.llm.blocks import BlockSpan, CacheSlot
from rayfin.llm.checkpoint import load_blocks, load_config, model_shape
from rayfin.llm.compression import WireTensor, check_compression, decode, encode
from rayfin.llm.kv_cache import KVCacheManager, SessionCache
from rayfin.llm.loading import resolve_model_path, torch_dtype
from rayfin.llm.lora import AdapterPayload, blocks_of, lora_applied
from rayfin.llm.priority import INFERENCE, Priority
from rayfin.llm.quantization import check_quantization, parameter_bytes, quantize_linears
from rayfin.llm.server_info import ServerConfig, ServerInfo, ServerRecord

# Weight of the newest sample in the per-block latency estimate clients route by.
_LATENCY_EMA = 0.2
# How often a server re-announces itself to its swarm's registry.
_HEARTBEAT_S = 5.0
# A session that stepped this recently is expected back soon: worth holding a batch for.
_ACTIVE_WITHIN_S = 0.5
# How often a server hands its figures to Ray's metrics (which exports them on its own
# schedule), and the most compute durations it keeps for the histogram in between.
_METRICS_S = 1.0
_METRICS_KEEP = 10_000
# Seconds per compute: a decode step of a few blocks on a GPU up to a long CPU prefill.
STEP_BUCKETS_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0]


@dataclass(slots=True)
class _Step:
    """A session's step: decode steps over the same blocks run as one batch."""

    cache: SessionCache
    hidden: torch.Tensor
    position: int
    future: asyncio.Future[torch.Tensor]
    order: tuple[int, int, int] = (0, 0, 0)


@dataclass(slots=True)
class _Task:
    """A stateless request (forward, backward): runs alone."""

    run: Callable[[], Any]
    future: asyncio.Future[Any]
    order: tuple[int, int, int] = field(default=(0, 0, 0))


_Queued = _Step | _Task


@dataclass(frozen=True, slots=True)
class _SessionContext:
    """How a session's steps run: their queue priority and the adapter applied to them."""

    priority: Priority = INFERENCE
    adapter: dict[str, torch.Tensor] | None = None
    scaling: float = 0.0


_PLAIN = _SessionContext()


def _adapter_of(step: _Step) -> dict[str, torch.Tensor] | None:
    return (step.cache.context or _PLAIN).adapter


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class BlockServer:
    """Blocks ``[config.start, config.end)`` of ``config.model``, with per-session KV caches."""

    def __init__(self, config: ServerConfig) -> None:
        check_quantization(config.quantization)
        check_compression(config.compression)
        self.started = time.monotonic()
        if config.device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            config = replace(config, device=device)
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cpu":
            torch.set_num_threads(config.threads or len(os.sched_getaffinity(0)))
        elif config.threads:
            torch.set_num_threads(config.threads)
        self.dtype = torch_dtype(config.dtype)

        path = resolve_model_path(config.model)
        hf_config = load_config(path)
        self.shape = model_shape(hf_config)
        layers, rotary = load_blocks(path, hf_config, config.start, config.end, self.dtype)
        quantize_linears(layers, config.quantization, device=self.device, compute_dtype=self.dtype)
        self.span = BlockSpan(layers, rotary.to(self.device), config.start)
        self.weight_bytes = parameter_bytes(layers)
        self.caches = KVCacheManager(
            config.cache_bytes,
            num_kv_heads=self.shape.num_kv_heads,
            head_dim=self.shape.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        # One compute thread: torch parallelises inside an op, and serial batches keep
        # each session's steps in order.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blocks")
        self._queue: list[_Queued] = []
        self._arrivals = itertools.count()
        self.adapters = AdapterCache()
        self.backward_passes = 0
        self.unpaid_bids = 0
        self._meter = WorkMeter(
            config.server_id, config.operator or config.server_id, swarm=config.swarm
        )
        self._drainer: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None
        self.requests = 0
        self.batches = 0
        self.largest_batch = 0
        self.tokens = 0
        self.busy_s = 0.0
        self.block_latency_s = self._measure_block_latency()
        # Prometheus (inside Ray): compute durations not yet observed, tokens exported so far.
        self._metrics = _ServerMetrics.create(config.server_id)
        self._computes: deque[float] = deque(maxlen=_METRICS_KEEP)
        self._tokens_exported = 0
        self._exporter: asyncio.Task[None] | None = None
        self.node_id = ray.get_runtime_context().get_node_id()
        from rayfin.llm.swarm import find_registry

        self._registry = find_registry(config.swarm)
        self._handle = ray.get_runtime_context().current_actor
        self._register()

    # -- lifecycle -------------------------------------------------------------------

    def _record(self) -> ServerRecord:
        return ServerRecord(
            server_id=self.config.server_id,
            handle=self._handle,
            start=self.config.start,
            end=self.config.end,
            node_id=self.node_id,
            device=str(self.device),
        )

    def _register(self) -> None:
        # Fire and forget, never blocking the event loop: a restarted server re-registers
        # under the same id, and a missing registry (a server outside any swarm) is fine.
        if self._registry is not None:
            self._registry.register.remote(self._record())

    def _measure_block_latency(self) -> float:
        """Time one decode step through the blocks: a first routing estimate and a warm-up."""
        hidden = torch.zeros(1, 1, self.shape.hidden_size, dtype=self.dtype, device=self.device)
        positions = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        timings = []
        with torch.no_grad():
            for _ in range(6):
                begin = time.perf_counter()
                self.span.forward(hidden, positions)
                timings.append(time.perf_counter() - begin)
        # The best of a few runs: start-up contends with neighbours loading their weights.
        return min(timings[1:]) / self.config.num_blocks

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_idle())
            self._meter.start(interval_s=1.0)
        if self._metrics is not None and (self._exporter is None or self._exporter.done()):
            self._exporter = asyncio.get_running_loop().create_task(self._export_metrics())

    async def _export_metrics(self) -> None:
        while True:
            self._export()
            await asyncio.sleep(_METRICS_S)

    def _export(self) -> None:
        """Hand the cache gauges, the tokens since the last export and the compute
        durations recorded since then to Ray's metrics."""
        metrics = self._metrics
        if metrics is None:
            return
        metrics.cache(self.caches.capacity_bytes, self.caches.used_bytes, self.caches.num_sessions)
        tokens = self.tokens  # written by the compute thread; one read, then the delta
        if tokens > self._tokens_exported:
            metrics.tokens.inc(tokens - self._tokens_exported, tags=metrics.tags)
            self._tokens_exported = tokens
        computes = self._computes
        while computes:  # the compute thread appends, only this loop takes
            metrics.step_seconds.observe(computes.popleft(), tags=metrics.tags)

    async def _reap_idle(self) -> None:
        interval = max(0.05, min(_HEARTBEAT_S, self.config.idle_timeout_s / 4))
        last_beat = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            self.caches.expire_idle(self.config.idle_timeout_s)
            if time.monotonic() - last_beat >= _HEARTBEAT_S:
                # Re-registering is idempotent; it brings back a server the registry
                # dropped while it was unreachable, and refills a restarted registry.
                self._register()
                last_beat = time.monotonic()

    async def ready(self) -> ServerInfo:
        """Returns once the weights are loaded; the launcher waits on it."""
        self._ensure_reaper()
        return await self.info()

    async def info(self) -> ServerInfo:
        """Configuration, memory use, throughput and free cache."""
        self._ensure_reaper()
        c = self.config
        return ServerInfo(
            server_id=c.server_id,
            swarm=c.swarm,
            model=c.model,
            start=c.start,
            end=c.end,
            node_id=self.node_id,
            device=str(self.device),
            dtype=c.dtype,
            quantization=c.quantization,
            compression=c.compression,
            weight_bytes=self.weight_bytes,
            cache_capacity_bytes=self.caches.capacity_bytes,
            cache_used_bytes=self.caches.used_bytes,
            rss_bytes=_rss_bytes(),
            sessions=self.caches.num_sessions,
            queued=len(self._queue),
            requests=self.requests,
            tokens=self.tokens,
            busy_s=self.busy_s,
            block_latency_s=self.block_latency_s,
            uptime_s=time.monotonic() - self.started,
            extra={
                "pid": os.getpid(),
                "batches": self.batches,
                "largest_batch": self.largest_batch,
                "threads": torch.get_num_threads(),
                "backward_passes": self.backward_passes,
                "unpaid_bids": self.unpaid_bids,
                "points_pending": self._meter.pending,
                "adapters_cached": len(self.adapters),
                "adapter_cache_bytes": self.adapters.used_bytes,
            },
        )

    async def leave(self) -> None:
        """Deregister from the swarm, then exit: clients route around this server."""
        self._export()
        await self._meter.aclose(timeout_s=5)
        if self._registry is not None:
            with contextlib.suppress(ray.exceptions.RayError):
                await self._registry.deregister.remote(self.config.server_id)
        ray.actor.exit_actor()

    # -- sessions --------------------------------------------------------------------

    def _check_range(self, start: int, end: int) -> None:
        if not self.config.start <= start < end <= self.config.end:
            raise SessionError(
                f"blocks [{start}, {end}) are not all on server {self.config.server_id} "
                f"(it holds [{self.config.start}, {self.config.end}))"
            )

    async def open(
        self,
        session_id: str,
        start: int,
        end: int,
        batch_size: int,
        max_length: int,
        wait_s: float | None = None,
        priority: Priority | None = None,
        adapter: AdapterPayload | None = None,
    ) -> None:
        """Reserve a KV cache for blocks ``[start, end)`` of a new session, whose steps
        queue with ``priority`` (default: inference, no bid) and run with ``adapter``'s
        LoRA matrices (the session keeps them until it closes)."""
        self._ensure_reaper()
        self._check_range(start, end)
        if max_length > self.shape.max_length:
            raise SessionError(
                f"max_length {max_length} exceeds the model's {self.shape.max_length} positions"
            )
        # Resolved before reserving or charging anything: a refused open costs nothing.
        tensors = self._adapter(adapter, start, end)
        await self.caches.allocate(
            session_id,
            first=start,
            num_layers=end - start,
            batch_size=batch_size,
            max_length=max_length,
            wait_s=wait_s,
        )
        if tensors is None and (priority is None or priority == INFERENCE):
            return
        context = _SessionContext(
            priority=await self._paid(priority or INFERENCE),
            adapter=tensors,
            scaling=adapter.scaling if adapter is not None else 0.0,
        )
        self.caches.get(session_id).context = context

    async def close(self, session_id: str) -> bool:
        """Free a session's cache; closing twice is harmless."""
        return self.caches.free(session_id)

    def _take(
        self, session_id: str, wire: WireTensor, position: int
    ) -> tuple[SessionCache, torch.Tensor]:
        cache = self.caches.get(session_id)
        hidden = decode(wire, self.device)
        batch, length = hidden.shape[0], hidden.shape[1]
        if position != cache.length:
            raise SessionError(
                f"session {session_id} is at position {cache.length} on this server, "
                f"the client sent position {position}"
            )
        if batch != cache.batch_size:
            raise SessionError(f"session {session_id} has batch {cache.batch_size}, got {batch}")
        if position + length > cache.max_length:
            raise SessionError(
                f"session {session_id} would reach {position + length} tokens, past its "
                f"max_length {cache.max_length}"
            )
        return cache, hidden

    async def step(self, steps: list[tuple[str, WireTensor, int]]) -> list[WireTensor | Exception]:
        """Run each ``(session_id, hidden, position)`` through its session's blocks,
        appending to the session's cache.

        A client sends the steps of all its concurrent sessions on this server in one call;
        they queue together, so their decode tokens run as one batched forward. Each entry
        gets its output or the error it raised: one bad session fails alone.
        """

        async def one(session_id: str, wire: WireTensor, position: int) -> WireTensor | Exception:
            try:
                cache, hidden = self._take(session_id, wire, position)
                out = await self._submit(cache, hidden, position)
                return encode(out, self.config.compression)
            except Exception as exc:
                return exc

        return list(await asyncio.gather(*(one(*entry) for entry in steps)))

    async def replay(self, session_id: str, wires: list[WireTensor]) -> list[WireTensor]:
        """Rebuild a session's cache from every input it has had; return each chunk's output.

        Used when a client fails over to this server, or comes back after its session here
        expired. Chunks run one by one, as they were first sent: the same shapes give the
        same floating-point results, so the rebuilt cache is the one the lost server had
        and generation continues with identical tokens. (One prefill over the whole
        history would be faster, but can flip a near-tie.)
        """
        cache = self.caches.get(session_id)
        chunks = [decode(wire, self.device) for wire in wires]
        total = sum(chunk.shape[1] for chunk in chunks)
        if total > cache.max_length:
            raise SessionError(f"history of {total} tokens exceeds the session's max_length")
        cache.length = 0
        outputs = []
        for chunk in chunks:
            out = await self._submit(cache, chunk, cache.length)
            outputs.append(encode(out, self.config.compression))
        return outputs

    async def _submit(
        self, cache: SessionCache, hidden: torch.Tensor, position: int
    ) -> torch.Tensor:
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        priority = (cache.context or _PLAIN).priority
        self._enqueue(_Step(cache, hidden, position, future, priority.order(next(self._arrivals))))
        return await future

    async def _paid(self, priority: Priority) -> Priority:
        """``priority`` with its bid charged to the client's account, or without the bid
        when it cannot be paid (too few points, no points bank): served, just not first."""
        if not priority.bid:
            return priority
        assert priority.account is not None
        if await self._meter.charge(priority.account, priority.bid):
            return priority
        self.unpaid_bids += 1
        return Priority(training=priority.training, account=priority.account)

    async def _run(self, run: Callable[[], Any], priority: Priority) -> Any:
        """Queue a stateless request by ``priority`` (its bid charged first) and wait."""
        priority = await self._paid(priority)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue(_Task(run, future, priority.order(next(self._arrivals))))
        return await future

    def _enqueue(self, item: _Queued) -> None:
        self._queue.append(item)
        self._arrived.set()
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    # -- stateless forward and backward (scoring, training) --------------------------------

    def _adapter(
        self, payload: AdapterPayload | None, start: int, end: int
    ) -> dict[str, torch.Tensor] | None:
        if payload is None:
            return None
        tensors = self.adapters.resolve(payload, self.device)
        outside = sorted(b for b in blocks_of(tensors) if not start <= b < end)
        if outside:
            raise SessionError(
                f"adapter {payload.key!r} has weights for blocks {outside[:4]} outside the "
                f"requested range [{start}, {end})"
            )
        return tensors

    def _positions(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.arange(hidden.shape[1], device=self.device).expand(hidden.shape[0], -1)

    async def forward(
        self,
        wire: WireTensor,
        start: int,
        end: int,
        adapter: AdapterPayload | None = None,
        priority: Priority | None = None,
    ) -> WireTensor:
        """A stateless forward through blocks ``[start, end)`` (no cache, full causal mask),
        with ``adapter``'s LoRA matrices applied for this request only."""
        self._check_range(start, end)
        hidden = decode(wire, self.device)
        tensors = self._adapter(adapter, start, end)
        scaling = adapter.scaling if adapter is not None else 0.0

        def run() -> torch.Tensor:
            begin = time.perf_counter()
            with torch.no_grad(), lora_applied(self.span.layers, self.span.first, tensors, scaling):
                out = self.span.forward(hidden, self._positions(hidden), None, start, end)
            self._account(1, hidden.shape[0] * hidden.shape[1], time.perf_counter() - begin)
            return out

        priority = priority or INFERENCE
        out = await self._run(run, priority)
        self._meter.add("forward", hidden.shape[0] * hidden.shape[1], end - start, priority.account)
        return encode(out, self.config.compression)

    async def backward(
        self,
        wire: WireTensor,
        grad_wire: WireTensor,
        start: int,
        end: int,
        adapter: AdapterPayload | None = None,
        priority: Priority | None = None,
    ) -> tuple[WireTensor, dict[str, torch.Tensor]]:
        """Gradients of blocks ``[start, end)`` at input ``wire`` for output gradient
        ``grad_wire``: the input's gradient, and each of ``adapter``'s matrices'.

        The forward is recomputed here from the input (the server keeps no activations
        between requests, so any replica can answer). Only the request's own copies of
        the adapter matrices get gradients: the blocks' weights are frozen.
        """
        self._check_range(start, end)
        hidden = decode(wire, self.device)
        grad = decode(grad_wire, self.device)
        if grad.shape != hidden.shape:
            raise SessionError(
                f"output gradient of shape {tuple(grad.shape)} for an input of shape "
                f"{tuple(hidden.shape)}"
            )
        tensors = self._adapter(adapter, start, end)
        scaling = adapter.scaling if adapter is not None else 0.0

        def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            begin = time.perf_counter()
            with torch.enable_grad():
                inputs = hidden.detach().requires_grad_(True)
                params = {n: t.detach().requires_grad_(True) for n, t in (tensors or {}).items()}
                with lora_applied(self.span.layers, self.span.first, params, scaling):
                    out = self.span.forward(inputs, self._positions(inputs), None, start, end)
                out.backward(grad.to(out.dtype))
            self.backward_passes += 1
            self._account(1, hidden.shape[0] * hidden.shape[1], time.perf_counter() - begin)
            assert inputs.grad is not None
            grads = {
                n: (p.grad if p.grad is not None else torch.zeros_like(p)).cpu()
                for n, p in params.items()
            }
            return inputs.grad, grads

        priority = priority or INFERENCE
        grad_in, grads = await self._run(run, priority)
        self._meter.add(
            "backward", hidden.shape[0] * hidden.shape[1], end - start, priority.account
        )
        return encode(grad_in, self.config.compression), grads

    async def release_adapter(self, key: str) -> bool:
        """Forget a client's cached adapter weights (a client calls this when done)."""
        return self.adapters.release(key)

    async def weights_digest(self) -> str:
        """SHA-256 over every weight and buffer of the served blocks: equal before and after
        any amount of training on this server."""

        def run() -> str:
            h = hashlib.sha256()
            for name, tensor in sorted(self.span.layers.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            return h.hexdigest()

        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    # -- batching --------------------------------------------------------------------

    def _head(self) -> _Queued:
        """The queued request to run next: the lowest priority order."""
        return min(self._queue, key=lambda item: item.order)

    def _next_batch(self) -> list[_Queued]:
        """The first request by priority, plus, for a decode step, every other queued
        single-token step over the same blocks."""
        first = self._head()
        self._queue.remove(first)
        batch: list[_Queued] = [first]
        if isinstance(first, _Task) or first.hidden.shape[1] != 1:
            return batch
        rows = first.hidden.shape[0]
        keep: list[_Queued] = []
        for item in self._queue:
            if isinstance(item, _Task):
                keep.append(item)
                continue
            same_blocks = (item.cache.first, item.cache.end) == (first.cache.first, first.cache.end)
            same_blocks = same_blocks and _adapter_of(item) is _adapter_of(first)
            fits = rows + item.hidden.shape[0] <= self.config.max_batch_rows
            if item.hidden.shape[1] == 1 and same_blocks and fits:
                batch.append(item)
                rows += item.hidden.shape[0]
            else:
                keep.append(item)
        self._queue = keep
        return batch

    async def _gather(self) -> None:
        """Hold a decode batch briefly while other recently active sessions are still due.

        Without this, sessions drift out of step across the pipeline and each forward
        carries one or two rows: the weights are read once per row instead of once per
        batch. The wait is bounded by ``batch_wait_s`` and skipped for a lone session.
        """
        head = self._head()
        if self.config.batch_wait_s <= 0 or isinstance(head, _Task) or head.hidden.shape[1] != 1:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.batch_wait_s
        while True:
            queued = {
                id(item.cache)
                for item in self._queue
                if isinstance(item, _Step) and item.hidden.shape[1] == 1
            }
            if len(queued) >= self.caches.active_sessions(_ACTIVE_WITHIN_S):
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=remaining)
            except TimeoutError:
                return

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch: list[_Queued] = []
            try:
                # Let requests delivered in the same instant join this batch.
                await asyncio.sleep(0)
                await self._gather()
                batch = self._next_batch()
                if isinstance(batch[0], _Task):
                    outputs = [await loop.run_in_executor(self._pool, batch[0].run)]
                else:
                    outputs = await loop.run_in_executor(self._pool, self._run_batch, batch)
            except Exception as exc:
                # Fail the requests, never the loop: a dead drain task would leave every
                # later request waiting forever.
                for item in batch or list(self._queue):
                    if not item.future.done():
                        item.future.set_exception(exc)
                if not batch:
                    self._queue.clear()
                continue
            for item, output in zip(batch, outputs, strict=True):
                if not item.future.done():
                    item.future.set_result(output)

    def _account(self, requests: int, tokens: int, elapsed: float) -> None:
        self.requests += requests
        self.tokens += tokens
        self.busy_s += elapsed
        if self._metrics is not None:
            self._computes.append(elapsed)  # observed by the next export

    def _run_batch(self, batch: list[_Step]) -> list[torch.Tensor]:
        slots: list[CacheSlot] = []
        positions: list[torch.Tensor] = []
        row = 0
        for item in batch:
            rows, length = item.hidden.shape[0], item.hidden.shape[1]
            slots.append(CacheSlot(slice(row, row + rows), item.cache, item.position))
            span = torch.arange(item.position, item.position + length, device=self.device)
            positions.append(span.expand(rows, -1))
            row += rows
        hidden = batch[0].hidden if len(batch) == 1 else torch.cat([b.hidden for b in batch])
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        start, end = batch[0].cache.first, batch[0].cache.end
        begin = time.perf_counter()
        context = batch[0].cache.context or _PLAIN  # a batch shares one adapter
        layers, first = self.span.layers, self.span.first
        with torch.no_grad(), lora_applied(layers, first, context.adapter, context.scaling):
            out = self.span.forward(hidden, torch.cat(positions), slots, start, end)
        elapsed = time.perf_counter() - begin
        self._account(len(batch), hidden.shape[0] * hidden.shape[1], elapsed)
        if hidden.shape[1] == 1:
            per_block = elapsed / (end - start)
            self.block_latency_s += _LATENCY_EMA * (per_block - self.block_latency_s)
        for item in batch:
            item.cache.length = item.position + item.hidden.shape[1]
            account = (item.cache.context or _PLAIN).priority.account
            self._meter.add(
                "inference", item.hidden.shape[0] * item.hidden.shape[1], end - start, account
            )
        return list(out.split([b.hidden.shape[0] for b in batch])) if len(batch) > 1 else [out]


@dataclass(slots=True)
class _ServerMetrics:
    """A server's Prometheus side (Ray adds ``ray_``, and ``_total`` to counters); every
    series is labelled with the server's id, one per server of the swarm."""

    tags: dict[str, str]
    capacity: Any
    used: Any
    sessions: Any
    tokens: Any
    step_seconds: Any

    @classmethod
    def create(cls, server_id: str) -> _ServerMetrics | None:
        if not ray.is_initialized():
            return None
        from ray.util import metrics

        tag_keys = ("server",)
        return cls(
            tags={"server": server_id},
            capacity=metrics.Gauge(
                "rayfin_llm_kv_cache_capacity_bytes",
                description="Bytes of KV cache a block server may reserve for sessions.",
                tag_keys=tag_keys,
            ),
            used=metrics.Gauge(
                "rayfin_llm_kv_cache_used_bytes",
                description="Bytes of KV cache reserved by a block server's open sessions "
                "(each reserves its whole max_length when it opens).",
                tag_keys=tag_keys,
            ),
            sessions=metrics.Gauge(
                "rayfin_llm_kv_cache_sessions",
                description="Inference sessions open on a block server (each holds a KV cache).",
                tag_keys=tag_keys,
            ),
            tokens=metrics.Counter(
                "rayfin_llm_server_tokens",
                description="Tokens (batch rows x positions) a block server pushed through its "
                "blocks: session steps and stateless forward and backward passes.",
                tag_keys=tag_keys,
            ),
            step_seconds=metrics.Histogram(
                "rayfin_llm_server_step_seconds",
                description="Compute seconds of one call into a block server's blocks: a "
                "batch of session steps, or a stateless forward or backward pass.",
                boundaries=STEP_BUCKETS_S,
                tag_keys=tag_keys,
            ),
        )

    def cache(self, capacity: int, used: int, sessions: int) -> None:
        self.capacity.set(float(capacity), tags=self.tags)
        self.used.set(float(used), tags=self.tags)
        self.sessions.set(float(sessions), tags=self.tags)
