"""The Kafka topics of the market pipeline, and :func:`ensure_topics` to create them.

* ``ticks``: trades, :class:`~rayfin.stream.schemas.Tick`, keyed by symbol;
* ``book``: level-2 snapshots, :class:`~rayfin.stream.schemas.BookUpdate`, keyed by symbol;
* ``news``: headlines, :class:`~rayfin.stream.schemas.News`, keyed by their first symbol
  (no key when they name none);
* ``dead-letters``: refused records, :class:`~rayfin.stream.schemas.DeadLetter`, keyed by
  the refused record's own key.

See ``docs/streaming.md``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from rayfin.errors import BrokerError

TICKS_TOPIC = "ticks"
"""Trades, one :class:`~rayfin.stream.schemas.Tick` per record."""
BOOK_TOPIC = "book"
"""Level-2 snapshots, one :class:`~rayfin.stream.schemas.BookUpdate` per record."""
NEWS_TOPIC = "news"
"""Headlines, one :class:`~rayfin.stream.schemas.News` per record."""
DEAD_LETTER_TOPIC = "dead-letters"
"""Records that failed validation, as :class:`~rayfin.stream.schemas.DeadLetter`."""

MARKET_TOPICS: tuple[str, ...] = (TICKS_TOPIC, BOOK_TOPIC, NEWS_TOPIC)
ALL_TOPICS: tuple[str, ...] = (*MARKET_TOPICS, DEAD_LETTER_TOPIC)

DEFAULT_PARTITIONS = 4
"""Partitions per topic created by :func:`ensure_topics`: room for a few consumers."""

_TOPIC_ALREADY_EXISTS = 36  # Kafka error code


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic names a deployment uses (a prefix per environment, say)."""

    ticks: str = TICKS_TOPIC
    book: str = BOOK_TOPIC
    news: str = NEWS_TOPIC
    dead_letters: str = DEAD_LETTER_TOPIC

    @classmethod
    def prefixed(cls, prefix: str) -> Topics:
        """The default names behind ``prefix`` (e.g. ``"staging."``)."""
        base = cls()
        return cls(*(prefix + getattr(base, f) for f in ("ticks", "book", "news", "dead_letters")))

    def kind(self, topic: str) -> str:
        """``ticks``, ``book`` or ``news`` for one of the market topics."""
        for kind in ("ticks", "book", "news"):
            if getattr(self, kind) == topic:
                return kind
        raise ValueError(f"{topic!r} is not one of the market topics {self}")

    @property
    def all(self) -> tuple[str, ...]:
        return (self.ticks, self.book, self.news, self.dead_letters)


def unreachable(bootstrap_servers: str, exc: BaseException) -> BrokerError:
    """The error for a Kafka that cannot be reached, with what to do about it."""
    return BrokerError(
        f"cannot reach Kafka at {bootstrap_servers} ({type(exc).__name__}); start the "
        "embedded broker with `rayfin broker start`, or point "
        "RAYFIN_BROKER__BOOTSTRAP_SERVERS at a running Kafka"
    )


async def ensure_topics(
    bootstrap_servers: str,
    partitions: int = DEFAULT_PARTITIONS,
    topics: Iterable[str] = ALL_TOPICS,
    *,
    replication_factor: int = 1,
) -> dict[str, str]:
    """Create the ``topics`` that do not exist yet; existing ones are left as they are.

    Returns ``{topic: "created" | "exists"}``. Idempotent, so every producer can call it
    on start. Raises :class:`~rayfin.errors.BrokerError` when Kafka cannot be reached or
    refuses a topic.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError

    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    names = list(dict.fromkeys(topics))
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="rayfin-admin")
    try:
        await admin.start()
    except (KafkaError, OSError) as exc:
        await admin.close()
        raise unreachable(bootstrap_servers, exc) from exc
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in names if t not in existing]
        result = {t: "exists" for t in names if t in existing}
        if missing:
            response = await admin.create_topics(
                [NewTopic(t, partitions, replication_factor) for t in missing]
            )
            # aiokafka returns per-topic error codes instead of raising.
            for topic, code, message in response.topic_errors:
                if code == 0:
                    result[topic] = "created"
                elif code == _TOPIC_ALREADY_EXISTS:  # created meanwhile by someone else
                    result[topic] = "exists"
                else:
                    raise BrokerError(
                        f"Kafka at {bootstrap_servers} refused to create topic {topic!r}: "
                        f"error {code} ({message})"
                    )
    except KafkaError as exc:
        raise BrokerError(f"creating topics on {bootstrap_servers} failed: {exc}") from exc
    finally:
        await admin.close()
    return {t: result[t] for t in names}
