"""Chunk-invariant window sums over one symbol's stream, and the state carried between chunks.

Every window here is a contiguous run ``[start, start + length)`` of one symbol's rows in
arrival order, so one primitive serves sliding and tumbling, tick-count and event-time
windows: :meth:`WindowSums.range_sums`. A running cumulative sum would make a window's
rounding depend on everything before it (prices near 1650 summed over 500k ticks lose
~1e-7), and restarting it per chunk would make it depend on where the chunks start.

Instead a window's sum is assembled from power-of-two pieces, one per set bit of its
length, largest first; the piece of size ``2**k`` starting at row ``j`` is the sum of a
fixed binary tree over rows ``j .. j + 2**k - 1`` (a "sparse table"). Both the pieces and
the order they are added in depend only on the window's own values and its length, never
on what lies outside it or where a chunk boundary fell, so the results are bit-identical
for any chunking, and the error stays at a few ulps of the window's own sum. The cost per
row is O(log(window length)), all in vectorised numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def event_times(ts: np.ndarray, watermark: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Event times clamped to the symbol's watermark, and which rows were late.

    A row is late when its ``ts`` is earlier than the latest ``ts`` seen before it; it is
    then treated as if it happened at that latest time, so event time never goes back.
    """
    event = np.maximum.accumulate(ts)
    if watermark is not None:
        np.maximum(event, watermark, out=event)
    return event, ts < event


class WindowSums:
    """Sums of a ``(rows, k)`` matrix of per-row values over runs of consecutive rows."""

    def __init__(self, values: np.ndarray, max_length: int) -> None:
        rows, k = values.shape
        levels = max(1, int(max_length).bit_length())
        # table[l, j] = sum of rows j .. j + 2**l - 1 (a perfect binary tree of adds);
        # entries running past the end are never used. Row `rows` stays zero: it is the
        # "no piece" row gathered for lengths without that bit, so no masking is needed.
        table = np.zeros((levels, rows + 1, k))
        table[0, :rows] = values
        for level in range(1, levels):
            half = 1 << (level - 1)
            if half >= rows:
                break
            below = table[level - 1]
            np.add(below[: rows - half], below[half:rows], out=table[level, : rows - half])
        self._table = table
        self._zero_row = rows

    def range_sums(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Sums of rows ``starts[i] .. ends[i]`` (inclusive), shape ``(m, k)``."""
        table = self._table
        lengths = ends - starts + 1
        if int(lengths.max(initial=0)) >> table.shape[0]:
            raise ValueError("a window is longer than these sums were built for")
        acc = np.zeros((len(starts), table.shape[2]))
        piece = np.empty_like(acc)
        pos = starts.astype(np.intp, copy=True)
        for level in range(table.shape[0] - 1, -1, -1):
            bit = (lengths >> level) & 1
            if not bit.any():  # adding the zero row would not change acc
                continue
            rows = np.where(bit.astype(bool), pos, self._zero_row)
            np.take(table[level], rows, axis=0, out=piece)
            acc += piece
            pos += bit << level
        return acc


@dataclass
class SymbolState:
    """What one symbol carries from chunk to chunk.

    ``event``/``raw`` hold the retained end of the stream (clamped event time and the
    per-row inputs the windows need), starting at absolute tick number ``seq0``.
    ``carry`` holds the recurrences' states (EMA, Wilder averages) by name; a missing name
    means "not seeded yet".
    """

    width: int
    seq_next: int = 0
    watermark: int | None = None
    seq0: int = 0
    event: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    raw: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    carry: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.raw.shape[1:] != (self.width,):
            self.raw = self.raw.reshape(-1, self.width)

    def working(self, event: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Retained rows followed by the new chunk's rows."""
        return np.concatenate((self.event, event)), np.concatenate((self.raw, raw))

    def advance(
        self,
        event_w: np.ndarray,
        raw_w: np.ndarray,
        rows: int,
        *,
        lookback_ticks: int,
        lookback_ns: int | None,
    ) -> None:
        """Take in a processed chunk of ``rows`` rows and drop what no future window needs.

        A future tick's tick-count windows reach back ``lookback_ticks`` rows; its
        event-time windows reach back to rows with event time after
        ``watermark - lookback_ns`` (the clamped event time only grows).
        """
        self.seq_next += rows
        self.watermark = int(event_w[-1])
        keep_from = self.seq_next - lookback_ticks
        if lookback_ns is not None:
            first_in_time = np.searchsorted(event_w, self.watermark - lookback_ns, side="right")
            keep_from = min(keep_from, self.seq0 + int(first_in_time))
        keep_from = max(keep_from, 0)
        cut = keep_from - self.seq0
        self.seq0 = keep_from
        # Copies, so the retained tail does not pin the whole working arrays in memory.
        self.event = event_w[cut:].copy()
        self.raw = raw_w[cut:].copy()


def sliding_tick_starts(seq: np.ndarray, n: int, seq0: int) -> np.ndarray:
    """Working-row index where the ``n``-tick window ending at each row starts (clipped at 0)."""
    return np.maximum(seq - (n - 1), 0) - seq0


def tumbling_tick_starts(seq: np.ndarray, n: int, seq0: int) -> np.ndarray:
    """Working-row index of the first row of each row's tumbling ``n``-tick window."""
    return seq - seq % n - seq0


def sliding_time_starts(event_w: np.ndarray, event: np.ndarray, width: int) -> np.ndarray:
    """First working row of each row's window ``(t - width, t]`` (the window ends at the row
    itself: rows with the same event time that arrive later are not in it)."""
    return np.searchsorted(event_w, event - width, side="right")


def tumbling_time_bounds(
    event_w: np.ndarray, event: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Start (ns, aligned to multiples of ``width`` since the epoch) and first working row."""
    start_ns = event - event % width  # numpy's % floors, so this also holds before 1970
    return start_ns, np.searchsorted(event_w, start_ns, side="left")
