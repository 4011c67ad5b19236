"""Turn raw Kafka record values into typed messages, or say exactly why not.

One entry point per topic (:func:`validate_tick`, :func:`validate_book`,
:func:`validate_news`, or :func:`validate` by topic name) returns the struct or raises
:class:`~rayfin.errors.InvalidMessage` with a ``reason`` from :data:`REASONS`.
:func:`decode_ticks` does the same for a whole micro-batch of ticks into numpy columns,
and :func:`dead_letter` wraps a rejected record for the ``dead-letters`` topic.

Timestamps are checked against a reference time: the Kafka record's timestamp when
given, else the wall clock. A ``ts`` before 1990, or more than ``max_skew_ns`` (default
one day) after the reference, is ``bad_timestamp``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import msgspec
import numpy as np

from rayfin.errors import InvalidMessage
from rayfin.stream.schemas import (
    BookUpdate,
    DeadLetter,
    Message,
    News,
    Tick,
)
from rayfin.stream.topics import BOOK_TOPIC, NEWS_TOPIC, TICKS_TOPIC

__all__ = [
    "BAD_BOOK",
    "BAD_JSON",
    "BAD_PRICE",
    "BAD_SIZE",
    "BAD_SYMBOL",
    "BAD_TIMESTAMP",
    "CROSSED_BOOK",
    "DEFAULT_MAX_SKEW_NS",
    "EMPTY_HEADLINE",
    "MIN_TS_NS",
    "REASONS",
    "SCHEMA",
    "DecodedTicks",
    "InvalidMessage",
    "dead_letter",
    "decode_dead_letter",
    "decode_ticks",
    "encode_dead_letter",
    "validate",
    "validate_book",
    "validate_news",
    "validate_tick",
]

BAD_JSON = "bad_json"
"""Not JSON at all (or an empty record)."""
SCHEMA = "schema"
"""JSON, but a required field is missing or has the wrong type."""
BAD_SYMBOL = "bad_symbol"
"""A symbol is empty or has surrounding whitespace."""
BAD_PRICE = "bad_price"
"""A price is ≤ 0, NaN, infinite or null (how JSON encoders write NaN)."""
BAD_SIZE = "bad_size"
"""A size is ≤ 0 or beyond int64."""
BAD_TIMESTAMP = "bad_timestamp"
"""``ts`` is before 1990, or more than the allowed skew after the reference time."""
BAD_BOOK = "bad_book"
"""A book with no levels at all, or levels out of order (bids must fall, asks rise)."""
CROSSED_BOOK = "crossed_book"
"""Best bid ≥ best ask."""
EMPTY_HEADLINE = "empty_headline"
"""A news headline that is empty or only whitespace."""

REASONS: tuple[str, ...] = (
    BAD_JSON,
    SCHEMA,
    BAD_SYMBOL,
    BAD_PRICE,
    BAD_SIZE,
    BAD_TIMESTAMP,
    BAD_BOOK,
    CROSSED_BOOK,
    EMPTY_HEADLINE,
)
"""Every ``InvalidMessage.reason`` this module raises."""

MIN_TS_NS = 631_152_000 * 10**9
"""1990-01-01T00:00:00Z in ns: anything earlier is not a real event time here."""
DEFAULT_MAX_SKEW_NS = 86_400 * 10**9
"""How far (one day) an event time may lie after the record's timestamp or now."""

S = TypeVar("S", Tick, BookUpdate, News)

_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {
    Tick: msgspec.json.Decoder(Tick),
    BookUpdate: msgspec.json.Decoder(BookUpdate),
    News: msgspec.json.Decoder(News),
}
_dead_letter_decoder = msgspec.json.Decoder(DeadLetter)
_encoder = msgspec.json.Encoder()

# msgspec's messages end in " - at `$.field[0][1]`"; the path tells which value was bad.
_PATH = re.compile(r" - at `\$\.(\w+)((?:\[\d+\])*)`$")
_LEVEL_FIELD = re.compile(r"^\[\d+\]\[(\d)\]$")


# -- decoding --------------------------------------------------------------------------


def _classify(exc: msgspec.ValidationError) -> InvalidMessage:
    """A msgspec type error as an InvalidMessage: value-range problems of prices, sizes
    and timestamps (null, out of range) get their own reason, the rest is ``schema``."""
    message = str(exc)
    match = _PATH.search(message)
    value_problem = (
        "got `null`" in message
        or "out of range" in message
        or ("Expected `int` <=" in message or "Expected `int` >=" in message)
    )
    if match and value_problem:
        field, index = match.groups()
        if field in ("bids", "asks"):
            level = _LEVEL_FIELD.match(index)
            if level:
                field = "price" if level.group(1) == "0" else "size"
        reason = {"price": BAD_PRICE, "size": BAD_SIZE, "ts": BAD_TIMESTAMP}.get(field)
        if reason is not None:
            return InvalidMessage(reason, message)
    return InvalidMessage(SCHEMA, message)


def _decode(raw: bytes | None, struct: type[S]) -> S:
    """Bytes to ``struct`` checking types only, or InvalidMessage."""
    if not raw:
        raise InvalidMessage(BAD_JSON, "empty record value")
    try:
        return _DECODERS[struct].decode(raw)
    except msgspec.ValidationError as exc:
        raise _classify(exc) from None
    except msgspec.DecodeError as exc:
        # Strict JSON has no NaN/Infinity, but Python's json module writes them; accept
        # them here so that such a price is reported as bad_price, not as bad JSON.
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise InvalidMessage(BAD_JSON, str(exc)) from None
        except TypeError:
            raise InvalidMessage(BAD_JSON, f"not bytes: {type(raw).__name__}") from None
        try:
            return msgspec.convert(obj, struct, strict=True)
        except msgspec.ValidationError as exc2:
            raise _classify(exc2) from None
    except TypeError:
        raise InvalidMessage(BAD_JSON, f"not bytes: {type(raw).__name__}") from None


# -- value checks ----------------------------------------------------------------------


def _reference_ns(record_ts_ms: int | None, now_ns: int | None) -> tuple[int, str]:
    if record_ts_ms is not None and record_ts_ms >= 0:
        return record_ts_ms * 1_000_000, "the record timestamp"
    return (time.time_ns() if now_ns is None else now_ns), "now"


def _check_ts(ts: int, reference_ns: int, what: str, max_skew_ns: int) -> None:
    if ts < MIN_TS_NS:
        raise InvalidMessage(BAD_TIMESTAMP, f"ts {ts} is before 1990")
    if ts > reference_ns + max_skew_ns:
        ahead = (ts - reference_ns) / 1e9
        raise InvalidMessage(
            BAD_TIMESTAMP,
            f"ts {ts} is {ahead:,.0f} s after {what} (at most {max_skew_ns / 1e9:,.0f} s)",
        )


def _good_symbol(symbol: str) -> bool:
    return bool(symbol) and symbol == symbol.strip()


def _check_symbol(symbol: str) -> None:
    if not _good_symbol(symbol):
        raise InvalidMessage(BAD_SYMBOL, f"symbol {symbol!r} is empty or padded")


def _check_price(price: float, where: str = "price") -> None:
    if not (math.isfinite(price) and price > 0):
        raise InvalidMessage(BAD_PRICE, f"{where} {price!r} is not a finite number > 0")


def _check_size(size: int, where: str = "size") -> None:
    if size <= 0:
        raise InvalidMessage(BAD_SIZE, f"{where} {size} is not > 0")


def _check_side(levels: list[tuple[float, int]], side: str, falling: bool) -> None:
    previous: float | None = None
    for i, (price, size) in enumerate(levels):
        _check_price(price, f"{side}[{i}] price")
        _check_size(size, f"{side}[{i}] size")
        if previous is not None and (price >= previous if falling else price <= previous):
            order = "fall" if falling else "rise"
            raise InvalidMessage(
                BAD_BOOK, f"{side} prices must strictly {order}: {previous} then {price}"
            )
        previous = price


# -- one record ------------------------------------------------------------------------


def validate_tick(
    raw: bytes | None,
    record_ts_ms: int | None = None,
    *,
    max_skew_ns: int = DEFAULT_MAX_SKEW_NS,
    now_ns: int | None = None,
) -> Tick:
    """A ``ticks`` record value as a :class:`Tick`, or :class:`InvalidMessage`."""
    tick = _decode(raw, Tick)
    _check_symbol(tick.symbol)
    _check_price(tick.price)
    _check_size(tick.size)
    _check_ts(tick.ts, *_reference_ns(record_ts_ms, now_ns), max_skew_ns)
    return tick


def validate_book(
    raw: bytes | None,
    record_ts_ms: int | None = None,
    *,
    max_skew_ns: int = DEFAULT_MAX_SKEW_NS,
    now_ns: int | None = None,
) -> BookUpdate:
    """A ``book`` record value as a :class:`BookUpdate`, or :class:`InvalidMessage`.

    A one-sided book is valid; a book with no levels at all is ``bad_book``.
    """
    book = _decode(raw, BookUpdate)
    _check_symbol(book.symbol)
    _check_ts(book.ts, *_reference_ns(record_ts_ms, now_ns), max_skew_ns)
    if not book.bids and not book.asks:
        raise InvalidMessage(BAD_BOOK, "the book has no levels on either side")
    _check_side(book.bids, "bids", falling=True)
    _check_side(book.asks, "asks", falling=False)
    if book.bids and book.asks and book.bids[0][0] >= book.asks[0][0]:
        raise InvalidMessage(
            CROSSED_BOOK, f"best bid {book.bids[0][0]} >= best ask {book.asks[0][0]}"
        )
    return book


def validate_news(
    raw: bytes | None,
    record_ts_ms: int | None = None,
    *,
    max_skew_ns: int = DEFAULT_MAX_SKEW_NS,
    now_ns: int | None = None,
) -> News:
    """A ``news`` record value as a :class:`News`, or :class:`InvalidMessage`."""
    news = _decode(raw, News)
    _check_ts(news.ts, *_reference_ns(record_ts_ms, now_ns), max_skew_ns)
    if not news.headline.strip():
        raise InvalidMessage(EMPTY_HEADLINE, f"headline {news.headline!r} is empty")
    for symbol in news.symbols:
        _check_symbol(symbol)
    return news


VALIDATORS: dict[str, Callable[..., Message]] = {
    TICKS_TOPIC: validate_tick,
    BOOK_TOPIC: validate_book,
    NEWS_TOPIC: validate_news,
}
"""The validator of each market topic."""


def validate(
    topic: str,
    raw: bytes | None,
    record_ts_ms: int | None = None,
    *,
    max_skew_ns: int = DEFAULT_MAX_SKEW_NS,
    now_ns: int | None = None,
) -> Message:
    """Validate ``raw`` with the validator of ``topic`` (``ticks``, ``book`` or ``news``)."""
    try:
        validator = VALIDATORS[topic]
    except KeyError:
        raise ValueError(f"no validator for topic {topic!r}; known: {sorted(VALIDATORS)}") from None
    return validator(raw, record_ts_ms, max_skew_ns=max_skew_ns, now_ns=now_ns)


# -- a micro-batch of ticks ------------------------------------------------------------


class DecodedTicks(NamedTuple):
    """What :func:`decode_ticks` returns; unpacks as ``columns, rejects``.

    ``columns`` holds equal-length numpy arrays of the accepted ticks, in input order:
    ``symbol`` (str), ``ts`` (int64 ns), ``price`` (float64), ``size`` (int64) and
    ``index`` (int64: each row's position in the input batch). ``rejects`` lists
    ``(index, reason, detail)`` for every refused record, by index.
    """

    columns: dict[str, np.ndarray]
    rejects: list[tuple[int, str, str]]


def decode_ticks(
    values: Sequence[bytes | None],
    record_ts_ms: Sequence[int] | None = None,
    *,
    max_skew_ns: int = DEFAULT_MAX_SKEW_NS,
    now_ns: int | None = None,
) -> DecodedTicks:
    """Decode and validate a micro-batch of ``ticks`` record values into columns.

    The same rules as :func:`validate_tick`, but value checks run vectorised over the
    batch. ``record_ts_ms`` are the records' Kafka timestamps (the skew reference; a
    negative one means "none" and falls back to now), one per value.
    """
    if record_ts_ms is not None and len(record_ts_ms) != len(values):
        raise ValueError(f"{len(values)} values but {len(record_ts_ms)} record timestamps")
    decode = _DECODERS[Tick].decode
    ticks: list[Tick] = []
    kept: list[int] = []
    rejects: list[tuple[int, str, str]] = []
    for i, raw in enumerate(values):
        try:
            ticks.append(decode(raw))
        except (msgspec.DecodeError, TypeError):
            try:
                ticks.append(_decode(raw, Tick))  # the slow path: reason, or a NaN price
            except InvalidMessage as exc:
                rejects.append((i, exc.reason, exc.detail))
                continue
        kept.append(i)

    n = len(ticks)
    index = np.array(kept, dtype=np.int64)
    symbols = [t.symbol for t in ticks]
    symbol = np.array(symbols, dtype=str) if n else np.array([], dtype=str)
    ts = np.fromiter([t.ts for t in ticks], dtype=np.int64, count=n)
    price = np.fromiter([t.price for t in ticks], dtype=np.float64, count=n)
    size = np.fromiter([t.size for t in ticks], dtype=np.int64, count=n)

    if record_ts_ms is None:
        reference = np.int64(time.time_ns() if now_ns is None else now_ns)
        now = int(reference)
    else:
        record = np.asarray(record_ts_ms, dtype=np.int64)[index]
        now = time.time_ns() if now_ns is None else now_ns
        reference = np.where(record >= 0, record * 1_000_000, now)

    # Value checks, vectorised; the refused rows then go through the scalar checks,
    # which name the reason and detail exactly as validate_tick does.
    refused = (
        _bad_symbols(symbols)
        | ~(np.isfinite(price) & (price > 0))
        | (size <= 0)
        | (ts < MIN_TS_NS)
        | (ts > reference + max_skew_ns)
    )
    if refused.any():
        for row in np.flatnonzero(refused).tolist():
            record_ts = None if record_ts_ms is None else record_ts_ms[kept[row]]
            try:
                validate_tick_values(ticks[row], record_ts, max_skew_ns, now)
            except InvalidMessage as exc:
                rejects.append((kept[row], exc.reason, exc.detail))
            else:  # the scalar rules have the last word
                refused[row] = False
        rejects.sort(key=lambda r: r[0])
        good = ~refused
        index, symbol, ts, price, size = (a[good] for a in (index, symbol, ts, price, size))

    columns = {"symbol": symbol, "ts": ts, "price": price, "size": size, "index": index}
    return DecodedTicks(columns, rejects)


def validate_tick_values(
    tick: Tick, record_ts_ms: int | None, max_skew_ns: int, now_ns: int | None
) -> None:
    """The value checks of :func:`validate_tick` on an already decoded tick."""
    _check_symbol(tick.symbol)
    _check_price(tick.price)
    _check_size(tick.size)
    _check_ts(tick.ts, *_reference_ns(record_ts_ms, now_ns), max_skew_ns)


def _bad_symbols(symbols: list[str]) -> np.ndarray:
    bad = {s for s in set(symbols) if not _good_symbol(s)}
    if not bad:
        return np.zeros(len(symbols), dtype=bool)
    return np.fromiter((s in bad for s in symbols), dtype=bool, count=len(symbols))


# -- dead letters ----------------------------------------------------------------------


def dead_letter(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    error: InvalidMessage | tuple[str, str],
    *,
    received_ts: int | None = None,
) -> DeadLetter:
    """Wrap a refused record for the ``dead-letters`` topic, keeping its bytes exactly.

    ``error`` is the :class:`InvalidMessage`, or a ``(reason, detail)`` pair such as the
    tail of a :func:`decode_ticks` reject. A record without a value becomes payload b"".
    """
    if isinstance(error, InvalidMessage):
        reason, detail = error.reason, error.detail
    else:
        reason, detail = error
    return DeadLetter(
        topic=topic,
        partition=partition,
        offset=offset,
        key=key,
        reason=reason,
        detail=detail,
        payload=value or b"",
        received_ts=time.time_ns() if received_ts is None else received_ts,
    )


def encode_dead_letter(letter: DeadLetter) -> bytes:
    """DeadLetter to JSON bytes (``key`` and ``payload`` as base64)."""
    return _encoder.encode(letter)


def decode_dead_letter(raw: bytes) -> DeadLetter:
    """JSON bytes back to a DeadLetter, with the original key and payload bytes."""
    return _dead_letter_decoder.decode(raw)
