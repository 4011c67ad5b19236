"""Wire schemas and validation of the stream topics: real payloads, no broker."""

from __future__ import annotations

import json
import pickle
import time

import msgspec
import numpy as np
import pytest

from rayfin.errors import InvalidMessage, RayfinError
from rayfin.stream.schemas import (
    BookUpdate,
    DeadLetter,
    News,
    Tick,
    decode_tick,
    encode,
    encode_tick,
    key_for,
    topic_for,
)
from rayfin.stream.topics import ALL_TOPICS, BOOK_TOPIC, NEWS_TOPIC, TICKS_TOPIC
from rayfin.stream.validation import (
    DEFAULT_MAX_SKEW_NS,
    REASONS,
    dead_letter,
    decode_dead_letter,
    decode_ticks,
    encode_dead_letter,
    validate,
    validate_book,
    validate_news,
    validate_tick,
)

NOW_NS = 1_763_700_000 * 10**9  # 2025-11-21: a fixed "now" for timestamp checks
TS = NOW_NS - 3_600 * 10**9
DAY_NS = 86_400 * 10**9
_DROP = object()  # a field to leave out of the payload


def tick_json(**fields: object) -> bytes:
    """A tick as a producer would write it with the standard library (NaN allowed)."""
    base: dict[str, object] = {"symbol": "ES", "ts": TS, "price": 1640.25, "size": 3}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not _DROP}).encode()


def book_json(**fields: object) -> bytes:
    base: dict[str, object] = {
        "symbol": "ABC",
        "ts": TS,
        "bids": [[99.99, 300], [99.98, 500]],
        "asks": [[100.01, 200], [100.02, 400]],
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not _DROP}).encode()


def news_json(**fields: object) -> bytes:
    base: dict[str, object] = {
        "ts": TS,
        "headline": "ABC beats estimates",
        "symbols": ["ABC"],
        "source": "wire",
        "id": "n1",
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not _DROP}).encode()


# -- round trips -----------------------------------------------------------------------


def test_each_struct_round_trips_through_json() -> None:
    tick = Tick(symbol="ES", ts=TS, price=1640.25, size=3)
    book = BookUpdate(symbol="ABC", ts=TS, bids=[(99.99, 300), (99.98, 5)], asks=[(100.01, 200)])
    news = News(ts=TS, headline="ABC beats estimates", symbols=["ABC", "XYZ"], source="w", id="1")
    letter = DeadLetter(
        topic="ticks",
        partition=2,
        offset=41,
        key=b"ES",
        reason="bad_json",
        detail="truncated",
        payload=b'{"symbol": "ES", "ts',
        received_ts=NOW_NS,
    )
    assert validate_tick(encode(tick), now_ns=NOW_NS) == tick
    assert decode_tick(encode_tick(tick)) == tick
    assert validate_book(encode(book), now_ns=NOW_NS) == book
    assert validate_news(encode(news), now_ns=NOW_NS) == news
    assert decode_dead_letter(encode_dead_letter(letter)) == letter
    # Levels are compact [price, size] pairs on the wire.
    assert json.loads(encode(book))["bids"] == [[99.99, 300], [99.98, 5]]
    assert (book.best_bid, book.best_ask) == (99.99, 100.01)
    assert book.mid == pytest.approx(100.0)


def test_keys_and_topics_follow_the_documented_rule() -> None:
    tick = Tick(symbol="ES", ts=TS, price=1.0, size=1)
    book = BookUpdate(symbol="ABC", ts=TS, bids=[(1.0, 1)], asks=[(1.01, 1)])
    news = News(ts=TS, headline="h", symbols=["XYZ", "ABC"], source="s", id="1")
    market_wide = News(ts=TS, headline="h", symbols=[], source="s", id="2")
    assert [key_for(m) for m in (tick, book, news, market_wide)] == [b"ES", b"ABC", b"XYZ", None]
    assert [topic_for(m) for m in (tick, book, news)] == [TICKS_TOPIC, BOOK_TOPIC, NEWS_TOPIC]
    assert ALL_TOPICS == ("ticks", "book", "news", "dead-letters")


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    raw = tick_json(venue="CME")
    assert validate_tick(raw, now_ns=NOW_NS).symbol == "ES"


# -- every rejection reason, from a real malformed payload -------------------------------

REJECTIONS: list[tuple[str, str, bytes, int | None]] = [
    # (reason, topic, payload, record timestamp in ms)
    ("bad_json", TICKS_TOPIC, b'{"symbol": "ES", "ts": 1378', None),
    ("bad_json", TICKS_TOPIC, b"not json at all", None),
    ("bad_json", TICKS_TOPIC, b"", None),
    ("bad_json", NEWS_TOPIC, b"\xff\xfe\x00garbage", None),
    ("schema", TICKS_TOPIC, tick_json(price=_DROP), None),  # missing field
    ("schema", TICKS_TOPIC, tick_json(price="1640.25"), None),  # wrong type
    ("schema", TICKS_TOPIC, tick_json(size=1.5), None),
    ("schema", TICKS_TOPIC, b"[1, 2, 3]", None),
    ("schema", BOOK_TOPIC, book_json(bids=[[99.99]]), None),
    ("schema", NEWS_TOPIC, news_json(symbols="ABC"), None),
    ("bad_symbol", TICKS_TOPIC, tick_json(symbol=""), None),
    ("bad_symbol", NEWS_TOPIC, news_json(symbols=["ABC", " "]), None),
    ("bad_price", TICKS_TOPIC, tick_json(price=-1.5), None),
    ("bad_price", TICKS_TOPIC, tick_json(price=0), None),
    ("bad_price", TICKS_TOPIC, tick_json(price=float("nan")), None),  # NaN token
    ("bad_price", TICKS_TOPIC, tick_json(price=float("inf")), None),  # Infinity token
    ("bad_price", TICKS_TOPIC, tick_json(price=None), None),  # how msgspec/JS write NaN
    ("bad_price", TICKS_TOPIC, b'{"symbol":"ES","ts":1,"price":1e400,"size":1}', None),
    ("bad_price", BOOK_TOPIC, book_json(asks=[[0.0, 10]]), None),
    ("bad_size", TICKS_TOPIC, tick_json(size=0), None),
    ("bad_size", TICKS_TOPIC, tick_json(size=-4), None),
    ("bad_size", TICKS_TOPIC, tick_json(size=2**64), None),
    ("bad_size", BOOK_TOPIC, book_json(bids=[[99.99, 0]]), None),
    ("bad_timestamp", TICKS_TOPIC, tick_json(ts=315_532_800 * 10**9), None),  # 1980
    ("bad_timestamp", TICKS_TOPIC, tick_json(ts=NOW_NS + 2 * DAY_NS), None),  # vs now
    ("bad_timestamp", TICKS_TOPIC, tick_json(ts=TS + 2 * DAY_NS), TS // 10**6),  # vs record
    ("bad_timestamp", TICKS_TOPIC, tick_json(ts=2**70), None),  # beyond int64
    ("bad_timestamp", BOOK_TOPIC, book_json(ts=-5), None),
    ("bad_timestamp", NEWS_TOPIC, news_json(ts=NOW_NS + 3 * DAY_NS), None),
    ("crossed_book", BOOK_TOPIC, book_json(bids=[[100.02, 1]], asks=[[100.01, 1]]), None),
    ("crossed_book", BOOK_TOPIC, book_json(bids=[[100.01, 1]], asks=[[100.01, 1]]), None),
    ("bad_book", BOOK_TOPIC, book_json(bids=[], asks=[]), None),
    ("bad_book", BOOK_TOPIC, book_json(bids=[[99.98, 1], [99.99, 1]]), None),  # not falling
    ("bad_book", BOOK_TOPIC, book_json(asks=[[100.02, 1], [100.02, 1]]), None),  # not rising
    ("empty_headline", NEWS_TOPIC, news_json(headline=""), None),
    ("empty_headline", NEWS_TOPIC, news_json(headline=" \t "), None),
]


@pytest.mark.parametrize(
    ("reason", "topic", "payload", "record_ts_ms"),
    REJECTIONS,
    ids=[f"{r}-{t}-{i}" for i, (r, t, _, _) in enumerate(REJECTIONS)],
)
def test_malformed_payload_is_rejected_with_its_reason(
    reason: str, topic: str, payload: bytes, record_ts_ms: int | None
) -> None:
    with pytest.raises(InvalidMessage) as info:
        validate(topic, payload, record_ts_ms, now_ns=NOW_NS)
    assert info.value.reason == reason, info.value.detail
    assert info.value.detail
    assert str(info.value).startswith(f"{reason}: ")


def test_every_reason_is_exercised() -> None:
    assert {r for r, *_ in REJECTIONS} == set(REASONS)


def test_the_skew_is_configurable_and_measured_from_the_record_timestamp() -> None:
    two_hours_ahead = tick_json(ts=NOW_NS + 2 * 3_600 * 10**9)
    assert validate_tick(two_hours_ahead, now_ns=NOW_NS).price == 1640.25
    with pytest.raises(InvalidMessage, match="bad_timestamp"):
        validate_tick(two_hours_ahead, now_ns=NOW_NS, max_skew_ns=3_600 * 10**9)
    # The record's own timestamp is the reference when given (a negative one is "none").
    far = tick_json(ts=NOW_NS + 5 * DAY_NS)
    assert validate_tick(far, (NOW_NS + 5 * DAY_NS) // 10**6, now_ns=NOW_NS)
    with pytest.raises(InvalidMessage, match="bad_timestamp"):
        validate_tick(far, -1, now_ns=NOW_NS)
    # Without now_ns the wall clock is the reference.
    assert validate_tick(tick_json(ts=time.time_ns())).symbol == "ES"
    assert DEFAULT_MAX_SKEW_NS == DAY_NS


def test_one_sided_books_are_valid() -> None:
    assert validate_book(book_json(asks=[]), now_ns=NOW_NS).best_ask is None
    assert validate_book(book_json(bids=[]), now_ns=NOW_NS).mid is None


def test_market_wide_news_without_symbols_is_valid() -> None:
    assert validate_news(news_json(symbols=[]), now_ns=NOW_NS).symbols == []


def test_invalid_message_is_a_rayfin_error_that_pickles() -> None:
    error = InvalidMessage("bad_price", "price -1 is not > 0")
    assert isinstance(error, RayfinError)
    again = pickle.loads(pickle.dumps(error))
    assert (again.reason, again.detail) == ("bad_price", "price -1 is not > 0")


def test_validate_refuses_unknown_topics() -> None:
    with pytest.raises(ValueError, match="no validator"):
        validate("dead-letters", b"{}")


# -- the batch decoder -------------------------------------------------------------------


def test_decode_ticks_keeps_order_and_indexes_a_mixed_batch() -> None:
    batch = [
        tick_json(price=1640.25, size=1),  # 0 ok
        b'{"symbol": "ES", "ts": 1',  # 1 bad_json
        tick_json(price=1640.50, size=2),  # 2 ok
        tick_json(price=0.0),  # 3 bad_price
        tick_json(symbol="NQ", price=15000.0, size=3),  # 4 ok
        tick_json(size=_DROP),  # 5 schema
        tick_json(ts=NOW_NS + 2 * DAY_NS),  # 6 bad_timestamp
        tick_json(price=float("nan")),  # 7 bad_price (NaN token, slow path)
        tick_json(symbol=""),  # 8 bad_symbol
        tick_json(size=0, price=-1.0),  # 9 bad_price: the first failing check wins
        None,  # 10 a tombstone: bad_json
        tick_json(price=1640.75, size=4),  # 11 ok
    ]
    columns, rejects = decode_ticks(batch, now_ns=NOW_NS)
    assert columns["index"].tolist() == [0, 2, 4, 11]
    assert columns["price"].tolist() == [1640.25, 1640.50, 15000.0, 1640.75]
    assert columns["size"].tolist() == [1, 2, 3, 4]
    assert columns["symbol"].tolist() == ["ES", "ES", "NQ", "ES"]
    assert columns["ts"].tolist() == [TS] * 4
    assert (columns["ts"].dtype, columns["price"].dtype) == (np.int64, np.float64)
    assert [(i, reason) for i, reason, _ in rejects] == [
        (1, "bad_json"),
        (3, "bad_price"),
        (5, "schema"),
        (6, "bad_timestamp"),
        (7, "bad_price"),
        (8, "bad_symbol"),
        (9, "bad_price"),
        (10, "bad_json"),
    ]
    # The batch rules agree with the per-record validator, detail included.
    for i, reason, detail in rejects:
        with pytest.raises(InvalidMessage) as info:
            validate_tick(batch[i], now_ns=NOW_NS)
        assert (info.value.reason, info.value.detail) == (reason, detail)


def test_decode_ticks_checks_skew_against_each_record_timestamp() -> None:
    batch = [tick_json(ts=TS), tick_json(ts=TS + 2 * DAY_NS), tick_json(ts=TS + 2 * DAY_NS)]
    record_ms = [TS // 10**6, TS // 10**6, (TS + 2 * DAY_NS) // 10**6]
    columns, rejects = decode_ticks(batch, record_ms, now_ns=NOW_NS)
    assert columns["index"].tolist() == [0, 2]
    assert [(i, r) for i, r, _ in rejects] == [(1, "bad_timestamp")]
    with pytest.raises(ValueError, match="record timestamps"):
        decode_ticks(batch, record_ms[:2])


def test_decode_ticks_of_an_empty_batch() -> None:
    columns, rejects = decode_ticks([])
    assert rejects == []
    assert all(len(column) == 0 for column in columns.values())
    assert set(columns) == {"symbol", "ts", "price", "size", "index"}


def test_decode_ticks_on_real_es_trades() -> None:
    from rayfin.datasets import es_ticks
    from rayfin.stream.replay import frame_to_ticks

    ticks = frame_to_ticks(es_ticks(limit=10_000))
    values = [encode_tick(t) for t in ticks]
    record_ms = [t.ts // 10**6 for t in ticks]
    columns, rejects = decode_ticks(values, record_ms)
    assert rejects == []
    assert columns["index"].tolist() == list(range(10_000))
    assert columns["ts"].tolist() == [t.ts for t in ticks]
    assert columns["price"].tolist() == [t.price for t in ticks]
    assert columns["size"].tolist() == [t.size for t in ticks]
    assert set(columns["symbol"].tolist()) == {"ES"}


# -- dead letters ------------------------------------------------------------------------


def test_dead_letter_keeps_the_exact_raw_payload() -> None:
    raw = b'\xff\x00{"symbol": "ES", "price": NaN}\n\xc3('  # not UTF-8, not JSON
    with pytest.raises(InvalidMessage) as info:
        validate_tick(raw)
    letter = dead_letter(TICKS_TOPIC, 3, 1234, b"\x00ES", raw, info.value, received_ts=NOW_NS)
    assert (letter.reason, letter.detail) == (info.value.reason, info.value.detail)
    wire = encode_dead_letter(letter)
    assert isinstance(json.loads(wire)["payload"], str)  # base64 text in JSON
    back = decode_dead_letter(wire)
    assert (back.payload, back.key) == (raw, b"\x00ES")
    assert (back.topic, back.partition, back.offset) == (TICKS_TOPIC, 3, 1234)
    assert key_for(back) == b"\x00ES"


def test_dead_letter_from_a_batch_reject_and_a_tombstone() -> None:
    _, rejects = decode_ticks([None, tick_json(price=-2.0)], now_ns=NOW_NS)
    (_, reason0, detail0), (_, reason1, detail1) = rejects
    empty = dead_letter(TICKS_TOPIC, 0, 7, None, None, (reason0, detail0))
    assert (empty.payload, empty.key, empty.reason) == (b"", None, "bad_json")
    assert abs(empty.received_ts - time.time_ns()) < 60 * 10**9
    letter = dead_letter(TICKS_TOPIC, 0, 8, b"ES", tick_json(price=-2.0), (reason1, detail1))
    assert decode_dead_letter(encode(letter)).payload == tick_json(price=-2.0)
    assert letter.reason == "bad_price"


def test_decode_tick_still_raises_msgspec_errors() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_tick(b"{")
