"""Wire schemas for the Kafka topics: typed msgspec structs, JSON-encoded by default."""

from __future__ import annotations

import msgspec

TICKS_TOPIC = "ticks"


class Tick(msgspec.Struct, frozen=True, kw_only=True):
    """One trade. ``ts`` is the exchange event time in nanoseconds since the epoch (UTC)."""

    symbol: str
    ts: int
    price: float
    size: int


_tick_encoder = msgspec.json.Encoder()
_tick_decoder = msgspec.json.Decoder(Tick)


def encode_tick(tick: Tick) -> bytes:
    """Tick to JSON bytes."""
    return _tick_encoder.encode(tick)


def decode_tick(raw: bytes) -> Tick:
    """JSON bytes to a Tick; raises ``msgspec.ValidationError``/``DecodeError`` when bad."""
    return _tick_decoder.decode(raw)
