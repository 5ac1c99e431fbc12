"""The one storage layer: local paths and gs://bucket/path behind one interface.

Everything in the trainer that reads or writes a file goes through this module.
`gs://` paths use google-cloud-storage (not tf.io.gfile, which cannot be pointed
at an emulator), through the client and lookups of trainer.gcs: with
STORAGE_EMULATOR_HOST set the client talks to that emulator anonymously,
otherwise it uses Application Default Credentials; it is created on first gs://
use, so local-only runs never touch cloud auth. Each function parses a gs:// path
once into a `trainer.gcs.GcsPath` and works with that value.

Missing objects raise FileNotFoundError for local and gs:// paths alike. Background
uploads (trainer.uploads) go through the functions here.
"""

from __future__ import annotations

import base64
import glob as _glob
import hashlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import BinaryIO

from trainer import gcs
from trainer.errors import UserError
from trainer.gcs import reset_client  # noqa: F401 - part of this module's interface

_GS = gcs.GS
_WILDCARDS = gcs.WILDCARDS
_CHUNK = 1 << 20


def is_gcs(path: str) -> bool:
    """Returns True for a gs://bucket/... path."""
    return path.startswith(_GS)


def join(base: str, *parts: str) -> str:
    """Joins path components; gs:// paths always use '/'."""
    if is_gcs(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def _has_wildcards(pattern: str) -> bool:
    return any(c in pattern for c in _WILDCARDS)


def _gcs_exists(path: gcs.GcsPath) -> bool:
    """True for the bucket itself, an object, or a folder holding at least one object."""
    if not path.name:
        return path.bucket_ref().exists(retry=gcs.retry())
    if path.blob().exists(retry=gcs.retry()):
        return True
    return any(True for _ in path.folder().list_blobs())


def exists(path: str) -> bool:
    """Returns True if `path` is a file/object or a non-empty folder."""
    gs = gcs.parse(path)
    if gs is None:
        return os.path.exists(path)
    return _gcs_exists(gs)


def read_bytes(path: str) -> bytes:
    """Returns the whole content of a file or object."""
    gs = gcs.parse(path)
    if gs is None:
        with open(path, "rb") as f:
            return f.read()
    try:
        return gs.blob().download_as_bytes(retry=gcs.retry())
    except gcs.not_found() as e:
        raise FileNotFoundError(path) from e


def read_text(path: str) -> str:
    """Returns the content of a file or object decoded as UTF-8."""
    return read_bytes(path).decode("utf-8")


class ChangedError(OSError):
    """A read pinned to a `fingerprint` found the file or object rewritten since."""


def _pinned_local(path: str, version: str) -> BinaryIO:
    try:
        f = open(path, "rb")  # noqa: SIM115 - the caller closes it.
    except FileNotFoundError as err:
        if version:
            raise ChangedError(f"{path} is gone since it was read first") from err
        raise
    if version and ":".join(map(str, _local_stat(os.fstat(f.fileno())))) != version:
        f.close()
        raise ChangedError(f"{path} changed since it was read first")
    return f


def _pinned_blob(gs: gcs.GcsPath, version: str):
    """The Blob, of the generation `version` names when one is given."""
    return gs.blob(int(version.rpartition(":")[2]) if version else None)


def _missing(path: str, version: str) -> OSError:
    return (ChangedError(f"{path} changed since it was read first: that generation is "
                         "gone") if version else FileNotFoundError(path))


def read_range(path: str, start: int, stop: int, version: str = "") -> bytes:
    """Returns bytes [start, stop) of a file or object (fewer at its end), in one read.

    gs:// uses a ranged download (no checksum is computed on a range).

    Args:
      path, start, stop: what to read.
      version: the `fingerprint` the file had when its pieces were measured: a local
        file whose size or modification time differs, or a gs:// object whose
        generation is gone (the read asks for that generation), raises ChangedError
        rather than returning other bytes of the same length. "" = whatever is there.
    """
    if stop <= start:
        return b""
    gs = gcs.parse(path)
    if gs is None:
        with _pinned_local(path, version) as f:
            f.seek(start)
            return f.read(stop - start)
    try:
        return _pinned_blob(gs, version).download_as_bytes(start=start, end=stop - 1,
                                                           retry=gcs.retry())
    except gcs.not_found() as e:
        raise _missing(path, version) from e


def open_read(path: str, version: str = "") -> BinaryIO:
    """A buffered binary reader over a file or object, for streaming it front to back;
    `version` pins it as `read_range`'s does."""
    gs = gcs.parse(path)
    if gs is None:
        return _pinned_local(path, version)
    blob = _pinned_blob(gs, version)
    try:
        blob.reload(retry=gcs.retry())
    except gcs.not_found() as e:
        raise _missing(path, version) from e
    return blob.open("rb", chunk_size=8 * _CHUNK, retry=gcs.retry())


def _atomic_local(path: str, fill: Callable[[BinaryIO], None]) -> None:
    """Writes `path` via a temp file in the same dir, so readers never see half a file."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(path: str, data: bytes, retry_timeout: float | None = None) -> None:
    """Writes `data` to `path`; local writes are atomic and create parent dirs.

    Args:
      path: local or gs:// destination.
      data: the bytes.
      retry_timeout: cap on the client library's own retries (gs:// only).
    """
    gs = gcs.parse(path)
    if gs is None:
        _atomic_local(path, lambda f: f.write(data))
        return
    # Explicit retry: uploads without if_generation_match are not retried by
    # default, but ours are idempotent overwrites.
    gs.blob().upload_from_string(data, retry=gcs.retry(retry_timeout))


def write_text(path: str, text: str) -> None:
    """Writes `text` as UTF-8 to `path` (atomically when local)."""
    write_bytes(path, text.encode("utf-8"))


def stat(path: str) -> tuple[int, str]:
    """(size in bytes, version): the modification time (ns) of a local file, the
    generation of a gs:// object (every overwrite makes a new one). No content is read."""
    gs = gcs.parse(path)
    if gs is None:
        return _local_stat(os.stat(path))
    blob = gs.get_blob()
    if blob is None:
        raise FileNotFoundError(path)
    return int(blob.size), str(blob.generation)


def _local_stat(info: os.stat_result) -> tuple[int, str]:
    return info.st_size, str(info.st_mtime_ns)


def size(path: str) -> int:
    """Returns the size of a file or object in bytes."""
    return stat(path)[0]


def fingerprint(path: str) -> str:
    """A string that changes whenever the file's content may have changed (size, version)."""
    return ":".join(map(str, stat(path)))


def delete(path: str) -> None:
    """Deletes one file or object; a missing one is not an error."""
    gs = gcs.parse(path)
    if gs is None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        return
    try:
        gs.blob().delete(retry=gcs.retry())
    except gcs.not_found():
        pass


def delete_prefix(path: str) -> None:
    """Deletes a folder: a local tree or every object under `path`/."""
    gs = gcs.parse(path)
    if gs is None:
        if os.path.isdir(path):
            shutil.rmtree(path)
        return
    for blob in list(gs.folder().list_blobs()):
        try:
            blob.delete(retry=gcs.retry())
        except gcs.not_found():
            pass


def listdir(path: str) -> list[str]:
    """Returns the sorted names of the files and folders directly in `path`.

    A missing folder gives [] (for gs:// an empty folder cannot exist anyway).
    """
    gs = gcs.parse(path)
    if gs is None:
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    folder = gs.folder()
    it = folder.list_blobs(delimiter="/")
    names = {b.name[len(folder.name) :] for b in it}  # Consuming `it` fills `it.prefixes`.
    names.update(p[len(folder.name) :].rstrip("/") for p in it.prefixes)
    names.discard("")
    return sorted(names)


def glob(pattern: str) -> list[str]:
    """Returns the sorted paths matching a pattern with * ? [..] wildcards.

    A pattern without wildcards gives [pattern] if it exists, else [].
    """
    gs = gcs.parse(pattern)
    if not _has_wildcards(pattern):
        found = os.path.exists(pattern) if gs is None else _gcs_exists(gs)
        return [pattern] if found else []
    if gs is None:
        return sorted(_glob.glob(pattern))
    files, folders = gs.glob()
    return sorted(files | folders)


def expand_patterns(patterns: str | Sequence[str]) -> list[str]:
    """Expands data patterns into the list of files they match.

    Args:
        patterns: a comma-separated string or a list of paths/globs.

    Returns:
        Matching files (directories skipped), deduplicated, in pattern order.

    Raises:
        UserError: for the first pattern that matches no file.
    """
    if isinstance(patterns, str):
        patterns = patterns.split(",")
    out: dict[str, None] = {}
    for pattern in (p.strip() for p in patterns):
        if not pattern:
            continue
        gs = gcs.parse(pattern)
        if gs is None:
            matches = [m for m in glob(pattern) if not os.path.isdir(m)]
        elif _has_wildcards(pattern):
            matches = sorted(gs.glob()[0])
        else:
            # Only an object matches a plain path: a folder is no file to read.
            is_object = bool(gs.name) and gs.blob().exists(retry=gcs.retry())
            matches = [pattern] if is_object else []
        if not matches:
            raise UserError(f"data pattern matched no files: {pattern}")
        out.update(dict.fromkeys(matches))
    return list(out)


def copy_file(src: str, dst: str, retry_timeout: float | None = None) -> None:
    """Copies one file between any mix of local and gs:// paths (local dst is atomic).

    Args:
      src: the file to copy.
      dst: where it goes; a local destination is written atomically.
      retry_timeout: cap on the client library's own retries (gs:// only).
    """
    _copy(gcs.parse(src) or src, gcs.parse(dst) or dst, retry_timeout)


def _copy(
    src: str | gcs.GcsPath, dst: str | gcs.GcsPath, retry_timeout: float | None = None
) -> None:
    """copy_file on parsed paths: a str is a local path, a GcsPath an object."""
    if isinstance(src, str) and isinstance(dst, str):
        with open(src, "rb") as f_in:
            _atomic_local(dst, lambda f_out: shutil.copyfileobj(f_in, f_out, _CHUNK))
        return
    retry = gcs.retry(retry_timeout)
    if isinstance(src, str):
        if not os.path.isfile(src):
            raise FileNotFoundError(src)
        dst.blob().upload_from_filename(src, retry=retry)
    elif isinstance(dst, str):
        src_blob = src.blob()
        try:
            _atomic_local(dst, lambda f: src_blob.download_to_file(f, retry=retry))
        except gcs.not_found() as e:
            raise FileNotFoundError(str(src)) from e
    else:
        src_blob, dst_blob = src.blob(), dst.blob()
        token = None
        try:
            # rewrite() may need several calls for large or cross-region objects.
            while True:
                token, _, _ = dst_blob.rewrite(src_blob, token=token, retry=retry)
                if token is None:
                    break
        except gcs.not_found() as e:
            raise FileNotFoundError(str(src)) from e


def upload_dir(local_dir: str, remote_dir: str) -> list[str]:
    """Copies every file under `local_dir` (recursively) to `remote_dir`.

    Args:
        local_dir: a local directory.
        remote_dir: a gs:// or local destination folder.

    Returns:
        The destination paths, in sorted walk order.
    """
    remote = gcs.parse(remote_dir)
    out = []
    for root, dirs, files in os.walk(local_dir):
        dirs.sort()
        for name in sorted(files):
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).split(os.sep)
            dst = os.path.join(remote_dir, *rel) if remote is None else remote.child(*rel)
            _copy(src, dst)
            out.append(str(dst))
    return out


def md5_file(local_path: str) -> str:
    """Returns the base64 MD5 of a local file, as GCS reports it in md5Hash."""
    digest = hashlib.md5()
    with open(local_path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode("ascii")
