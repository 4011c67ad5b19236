"""How requests queue on a block server: inference before training, higher bids first.

A request carries a :class:`Priority`. The server runs the queued request with the lowest
:meth:`Priority.order`: every inference request (cached decode and prefill steps, stateless
forwards for scoring) before any training request (forwards and backwards with gradients),
and within each class the higher bid first, then arrival order. A bid is points the
client's account pays for that request (see :mod:`rayfin.llm.points`); the server charges
it before queueing, so an unfunded bid is refused rather than served.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Priority:
    """``training`` puts a request behind all inference; ``bid`` points (paid by
    ``account``) move it ahead of lower bids of its class."""

    training: bool = False
    bid: int = 0
    account: str | None = None

    def __post_init__(self) -> None:
        if self.bid < 0:
            raise ValueError(f"a bid cannot be negative, got {self.bid}")
        if self.bid and not self.account:
            raise ValueError("a bid needs the account that pays it")

    def order(self, seq: int) -> tuple[int, int, int]:
        """Sort key on a server's queue; ``seq`` is the arrival number."""
        return (int(self.training), -self.bid, seq)


INFERENCE = Priority()
TRAINING = Priority(training=True)
