"""Runs gcp-storage-emulator with every file it writes replaced whole (conftest starts it).

The emulator writes its objects and its metadata file (`.meta`, all objects' sizes and
checksums, rewritten on every change) in place. A test that stops it mid-write to cut a
job off from its bucket could leave `.meta` truncated; putting back an older copy then
dropped writes the job had already been told had succeeded, so an object's bytes and its
recorded checksum could disagree (DataCorruption on the next read), which no real bucket
does. Here each file is written to a temporary file beside it and renamed over it: a stop
leaves every file whole, old or new, and a write cut off before its answer is retried by
the job's storage client.

    python tests/storage_emulator.py -d DATA_DIR start --host 127.0.0.1 --port PORT -q
"""

from __future__ import annotations

import os
import pathlib
import runpy
import tempfile


def _write_bytes(self: pathlib.Path, data: bytes) -> int:
    handle, temp = tempfile.mkstemp(dir=self.parent, prefix=f".{self.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            written = f.write(data)
        os.replace(temp, self)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    return written


if __name__ == "__main__":
    pathlib.Path.write_bytes = _write_bytes
    runpy.run_module("gcp_storage_emulator", run_name="__main__", alter_sys=True)
