"""The Parquet archive of raw records and features, and the idempotent sink on top of it.

Layout under ``root`` (a local path or an ``s3://`` URI, through pyarrow's filesystems)::

    <table>/symbol=<symbol>/date=<YYYY-MM-DD>/<topic>-p<partition>-<first>-<last>.parquet
    _checkpoints/<topic>-p<partition>.ckpt

Every row carries its source ``(partition, offset)``. A consumer writes a partition's rows
for an offset range as files named by that range, then replaces the partition's
checkpoint: the highest offset now written (the high-water mark) and the feature state
after it. Only then does it commit the offsets to Kafka. So:

- a crash before the checkpoint leaves files past the high-water mark: :meth:`recover`
  deletes them, and readers never see them (:meth:`read` keeps offsets ≤ the mark);
- a crash after the checkpoint but before the Kafka commit replays records the archive
  already has: the consumer skips offsets ≤ the mark;

and each source offset ends up in exactly one row, whatever the crash. Dates are UTC
dates of the event time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayfin.errors import RayfinError
from rayfin.storage import put_atomic

CHECKPOINT_DIR = "_checkpoints"
_FILE = re.compile(r"^(?P<topic>.+)-p(?P<partition>\d+)-(?P<first>\d+)-(?P<last>\d+)\.parquet$")


class ArchiveError(RayfinError):
    """The archive could not be read or written."""


class PartitionMovedError(ArchiveError):
    """The partition's checkpoint moved on since this writer read it: another consumer
    owns the partition now."""


class Checkpoint(msgspec.Struct, frozen=True):
    """Where a partition's archive stands: every offset ≤ ``hwm`` is written, and
    ``state`` is the feature state right after offset ``hwm``."""

    topic: str
    partition: int
    hwm: int
    state: bytes = b""


@dataclass(frozen=True, slots=True)
class ArchivedFile:
    path: str
    topic: str
    partition: int
    first: int
    last: int


class Archive:
    """Raw and feature tables in Parquet, partitioned by symbol and date."""

    def __init__(self, root: str) -> None:
        try:
            self.fs, base = pafs.FileSystem.from_uri(root)
        except (pa.ArrowInvalid, ValueError):
            self.fs, base = pafs.LocalFileSystem(), str(root)
        self.root = base.rstrip("/")
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Checkpoint)

    # -- checkpoints -----------------------------------------------------------------

    def _checkpoint_path(self, topic: str, partition: int) -> str:
        return f"{self.root}/{CHECKPOINT_DIR}/{topic}-p{partition}.ckpt"

    def checkpoint(self, topic: str, partition: int) -> Checkpoint:
        """The partition's checkpoint; ``hwm`` is -1 when nothing was written yet."""
        path = self._checkpoint_path(topic, partition)
        try:
            with self.fs.open_input_stream(path) as stream:
                return self._decoder.decode(stream.read())
        except FileNotFoundError:
            return Checkpoint(topic, partition, -1)
        except msgspec.DecodeError as exc:
            raise ArchiveError(f"checkpoint {path} is unreadable: {exc}") from exc

    def _put(self, path: str, data: bytes) -> None:
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        put_atomic(self.fs, path, data)

    # -- writing ---------------------------------------------------------------------

    def write(
        self,
        topic: str,
        partition: int,
        tables: dict[str, pa.Table],
        checkpoint: Checkpoint,
        after: int | None = None,
    ) -> list[str]:
        """Write each table's rows (one source partition, offsets after the current mark),
        one file per symbol and date, then move the partition's checkpoint forward.

        With ``after``, first check that the checkpoint still stands at ``after``, and
        raise :class:`PartitionMovedError` if not: a writer that lost its partition to
        another consumer does not overwrite that consumer's progress. (The check and the
        write are not one atomic step; it catches a late writer, not a simultaneous one.)
        """
        if after is not None and (current := self.checkpoint(topic, partition).hwm) != after:
            raise PartitionMovedError(
                f"{topic} partition {partition} is archived up to offset {current}, not "
                f"{after}: another consumer has taken it over"
            )
        written = []
        for name, table in tables.items():
            if table.num_rows == 0:
                continue
            for symbol, date, part in _split(table):
                offsets = part.column("offset")
                first, last = pc.min(offsets).as_py(), pc.max(offsets).as_py()
                folder = f"{self.root}/{name}/symbol={symbol}/date={date}"
                path = f"{folder}/{topic}-p{partition}-{first:012d}-{last:012d}.parquet"
                self.fs.create_dir(folder, recursive=True)
                # lz4: a fraction of zstd's CPU, which the live stream shares the cores with.
                pq.write_table(part, path, filesystem=self.fs, compression="lz4")
                written.append(path)
        self._put(self._checkpoint_path(topic, partition), self._encoder.encode(checkpoint))
        return written

    # -- reading and recovery ----------------------------------------------------------

    def files(self, table: str) -> list[ArchivedFile]:
        """Every file of ``table`` with the offset range its name records."""
        selector = pafs.FileSelector(f"{self.root}/{table}", recursive=True, allow_not_found=True)
        found = []
        for info in self.fs.get_file_info(selector):
            match = _FILE.match(info.base_name) if info.is_file else None
            if match:
                found.append(
                    ArchivedFile(
                        info.path,
                        match["topic"],
                        int(match["partition"]),
                        int(match["first"]),
                        int(match["last"]),
                    )
                )
        return found

    def recover(self, topic: str, partition: int, tables: Iterable[str]) -> Checkpoint:
        """Delete files a crash left past the partition's mark; return its checkpoint."""
        checkpoint = self.checkpoint(topic, partition)
        for table in tables:
            for f in self.files(table):
                if f.topic == topic and f.partition == partition and f.last > checkpoint.hwm:
                    self.fs.delete_file(f.path)
        return checkpoint

    def committed_files(self, table: str) -> list[str]:
        """Paths of ``table``'s files that their partition's checkpoint covers. A batch
        only writes offsets past the mark, so a file is wholly below it or wholly above
        (left by a crash, not yet recovered)."""
        files = self.files(table)
        marks = {key: self.checkpoint(*key).hwm for key in {(f.topic, f.partition) for f in files}}
        return sorted(f.path for f in files if f.last <= marks[(f.topic, f.partition)])

    def read(self, table: str, columns: list[str] | None = None) -> pa.Table:
        """Every committed row of ``table``, sorted by source partition and offset (those
        of them among ``columns``)."""
        paths = self.committed_files(table)
        if not paths:
            return pa.table({})
        parts = [pq.read_table(p, filesystem=self.fs, columns=columns) for p in paths]
        merged = pa.concat_tables(parts, promote_options="default")
        keys = [(k, "ascending") for k in ("partition", "offset") if k in merged.column_names]
        return merged.sort_by(keys) if keys else merged

    def dataset(self, table: str) -> Any:
        """``table``'s committed rows as a Ray Dataset in arrival order (by source
        partition and offset), for training and recomputing features on history."""
        import ray.data

        paths = self.committed_files(table)
        if not paths:
            raise ArchiveError(f"the archive at {self.root} has no committed {table!r} rows")
        rows = ray.data.read_parquet(paths, filesystem=self.fs, partitioning=None)
        return rows.sort(["partition", "offset"])


def _split(table: pa.Table) -> Iterable[tuple[str, str, pa.Table]]:
    """``table`` cut by symbol and UTC date of ``ts`` (ns), keeping row order."""
    symbols = table.column("symbol").to_numpy(zero_copy_only=False).astype(str)
    days = table.column("ts").to_numpy().astype("datetime64[ns]").astype("datetime64[D]")
    keys = np.char.add(np.char.add(symbols, "\x1f"), days.astype(str))
    for key in dict.fromkeys(keys.tolist()):
        symbol, date = key.split("\x1f")
        yield symbol, date, table.filter(pa.array(keys == key))
