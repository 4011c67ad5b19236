"""Wire schemas for the Kafka topics: typed msgspec structs, JSON-encoded by default.

All timestamps (``ts``) are event times in integer nanoseconds since the epoch, UTC.
Prices are floats in the instrument's currency, sizes are integer quantities.

Partition keys (:func:`key_for`): a Tick or BookUpdate is keyed by its ``symbol``, News
by ``symbols[0]`` (no key, so round-robin, when it names no symbol), a DeadLetter by the
refused record's own key. :func:`topic_for` gives each struct's topic.

Decoding ignores unknown fields, so producers may add fields without breaking consumers.
Value checks (ranges, crossed books, ...) live in :mod:`rayfin.stream.validation`.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from rayfin.stream.topics import (
    BOOK_TOPIC,
    DEAD_LETTER_TOPIC,
    NEWS_TOPIC,
    TICKS_TOPIC,
)

__all__ = [
    "BOOK_TOPIC",
    "DEAD_LETTER_TOPIC",
    "NEWS_TOPIC",
    "TICKS_TOPIC",
    "BookUpdate",
    "DeadLetter",
    "Level",
    "Message",
    "News",
    "Tick",
    "decode_tick",
    "encode",
    "encode_tick",
    "key_for",
    "topic_for",
]

# Bounds of a signed 64-bit integer: values outside cannot live in a numpy int64 column,
# so the decoder rejects them (validation reports them as bad_timestamp / bad_size).
_INT64 = msgspec.Meta(ge=-(2**63), le=2**63 - 1)
Int64 = Annotated[int, _INT64]

Level = tuple[float, Int64]
"""One book level, ``[price, size]`` on the wire."""


class Tick(msgspec.Struct, frozen=True, kw_only=True):
    """One trade. ``ts`` is the exchange event time in nanoseconds since the epoch (UTC).

    Wire form: ``{"symbol":"ES","ts":1378072800000000000,"price":1640.25,"size":3}``.
    """

    symbol: str
    ts: Int64
    price: float
    size: Int64


class BookUpdate(msgspec.Struct, frozen=True, kw_only=True):
    """A level-2 snapshot of one symbol's order book at event time ``ts`` (ns, UTC).

    ``bids`` and ``asks`` are ``[price, size]`` pairs, best first: bids by falling price,
    asks by rising price. Wire form:
    ``{"symbol":"ABC","ts":...,"bids":[[99.98,300],[99.97,500]],"asks":[[100.0,200]]}``.
    """

    symbol: str
    ts: Int64
    bids: list[Level]
    asks: list[Level]

    @property
    def best_bid(self) -> float | None:
        return self.bids[0][0] if self.bids else None

    @property
    def best_ask(self) -> float | None:
        return self.asks[0][0] if self.asks else None

    @property
    def mid(self) -> float | None:
        if not self.bids or not self.asks:
            return None
        return (self.bids[0][0] + self.asks[0][0]) / 2


class News(msgspec.Struct, frozen=True, kw_only=True):
    """A headline at ``ts`` (ns, UTC) about ``symbols`` (may be empty: market-wide).

    ``id`` is unique per story at its ``source``, for de-duplication.
    """

    ts: Int64
    headline: str
    symbols: list[str]
    source: str
    id: str


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A record that failed validation, with where it came from and why.

    ``key`` and ``payload`` are the record's raw key and value bytes, kept exactly: in JSON
    they are **base64** strings (msgspec's encoding of ``bytes``), and decoding a
    DeadLetter gives the original bytes back. ``reason`` is one of
    :data:`rayfin.stream.validation.REASONS`, ``detail`` a human-readable explanation,
    ``received_ts`` when the dead letter was made (ns, UTC).
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    reason: str
    detail: str
    payload: bytes
    received_ts: int


Message = Tick | BookUpdate | News | DeadLetter

_encoder = msgspec.json.Encoder()
_tick_decoder = msgspec.json.Decoder(Tick)


def encode(message: Message) -> bytes:
    """Any of the structs to JSON bytes."""
    return _encoder.encode(message)


def encode_tick(tick: Tick) -> bytes:
    """Tick to JSON bytes."""
    return _encoder.encode(tick)


def decode_tick(raw: bytes) -> Tick:
    """JSON bytes to a Tick, checking types only; raises ``msgspec.ValidationError`` or
    ``msgspec.DecodeError``. Use :func:`rayfin.stream.validation.validate_tick` to also
    check values."""
    return _tick_decoder.decode(raw)


def key_for(message: Message) -> bytes | None:
    """The Kafka partition key of ``message`` (see the module table)."""
    if isinstance(message, Tick | BookUpdate):
        return message.symbol.encode()
    if isinstance(message, News):
        return message.symbols[0].encode() if message.symbols else None
    return message.key


_TOPICS: dict[type, str] = {
    Tick: TICKS_TOPIC,
    BookUpdate: BOOK_TOPIC,
    News: NEWS_TOPIC,
    DeadLetter: DEAD_LETTER_TOPIC,
}


def topic_for(message: Message) -> str:
    """The topic a message of this type belongs on."""
    return _TOPICS[type(message)]
