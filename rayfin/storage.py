"""Files on a local disk or an object store, through pyarrow filesystems."""

from __future__ import annotations

import uuid

import pyarrow.fs as pafs


def put_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never
    half of one: an object store's PUT is atomic; on a local disk the bytes go to a staging
    file of their own (concurrent writers never share one) that is renamed into place."""
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    staging = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(staging) as out:
        out.write(data)
    fs.move(staging, path)
