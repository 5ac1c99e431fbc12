"""The one storage layer: local paths and gs://bucket/path behind one interface.

Everything in the trainer that reads or writes a file goes through this module.
`gs://` paths use google-cloud-storage (not tf.io.gfile, which cannot be pointed
at an emulator). If STORAGE_EMULATOR_HOST is set the client talks to that
emulator anonymously; otherwise it uses Application Default Credentials. The
client is created lazily on first gs:// use, so local-only runs never touch
cloud auth. Tests set TRAINER_REQUIRE_EMULATOR=1 so that a real client can
never be created by accident.

Missing objects raise FileNotFoundError for local and gs:// paths alike. Background
uploads (trainer.uploads) go through the functions here.
"""

from __future__ import annotations

import base64
import fnmatch
import glob as _glob
import hashlib
import os
import posixpath
import shutil
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from trainer.errors import UserError

_GS = "gs://"
_WILDCARDS = "*?["
_CHUNK = 1 << 20

# (pid, emulator host, client): rebuilt after fork or when the emulator moves.
_client_cache: tuple[int, str | None, Any] | None = None
_client_lock = threading.Lock()


def is_gcs(path: str) -> bool:
    """Returns True for a gs://bucket/... path."""
    return path.startswith(_GS)


def join(base: str, *parts: str) -> str:
    """Joins path components; gs:// paths always use '/'."""
    if is_gcs(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def reset_client() -> None:
    """Drops the cached client, e.g. after STORAGE_EMULATOR_HOST changed."""
    global _client_cache
    with _client_lock:
        _client_cache = None


def _client() -> Any:
    global _client_cache
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    with _client_lock:
        cache = _client_cache
        if cache is None or cache[0] != os.getpid() or cache[1] != emulator:
            cache = (os.getpid(), emulator, _make_client(emulator))
            _client_cache = cache
        return cache[2]


def _make_client(emulator: str | None) -> Any:
    # Imported here so that local-only runs never load cloud auth.
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    if os.environ.get("TRAINER_REQUIRE_EMULATOR") == "1":
        host = urllib.parse.urlparse(emulator or "").hostname
        if host not in ("127.0.0.1", "localhost"):
            raise RuntimeError(
                "TRAINER_REQUIRE_EMULATOR=1 but STORAGE_EMULATOR_HOST is "
                f"{emulator!r}; refusing to create a real Cloud Storage client"
            )
    if emulator:
        # A project id keeps Client() from searching for real credentials.
        project = os.environ.get("GOOGLE_CLOUD_PROJECT", "emulator-project")
        return gcs.Client(project=project, credentials=AnonymousCredentials())
    return gcs.Client()


def _retry(timeout: float | None = None) -> Any:
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY if timeout is None else DEFAULT_RETRY.with_timeout(timeout)


def _not_found() -> type[Exception]:
    from google.api_core.exceptions import NotFound

    return NotFound


def _split(path: str) -> tuple[str, str]:
    bucket, _, name = path[len(_GS) :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {path!r}")
    return bucket, name


def _blob(path: str) -> Any:
    bucket, name = _split(path)
    return _client().bucket(bucket).blob(name)


def _list(prefix_path: str, delimiter: str | None = None) -> Any:
    bucket, prefix = _split(prefix_path)
    return _client().list_blobs(bucket, prefix=prefix, delimiter=delimiter, retry=_retry())


def _folder(path: str) -> str:
    return path if path.endswith("/") else path + "/"


def exists(path: str) -> bool:
    """Returns True if `path` is a file/object or a non-empty folder."""
    if not is_gcs(path):
        return os.path.exists(path)
    bucket, name = _split(path)
    if not name:
        return _client().bucket(bucket).exists(retry=_retry())
    if _blob(path).exists(retry=_retry()):
        return True
    return any(True for _ in _list(_folder(path)))


def read_bytes(path: str) -> bytes:
    """Returns the whole content of a file or object."""
    if not is_gcs(path):
        with open(path, "rb") as f:
            return f.read()
    try:
        return _blob(path).download_as_bytes(retry=_retry())
    except _not_found() as e:
        raise FileNotFoundError(path) from e


def read_text(path: str) -> str:
    """Returns the content of a file or object decoded as UTF-8."""
    return read_bytes(path).decode("utf-8")


def read_range(path: str, start: int, stop: int) -> bytes:
    """Returns bytes [start, stop) of a file or object (fewer at its end), in one read.

    gs:// uses a ranged download (no checksum is computed on a range).
    """
    if stop <= start:
        return b""
    if not is_gcs(path):
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(stop - start)
    try:
        return _blob(path).download_as_bytes(start=start, end=stop - 1, retry=_retry())
    except _not_found() as e:
        raise FileNotFoundError(path) from e


def open_read(path: str) -> BinaryIO:
    """A buffered binary reader over a file or object, for streaming it front to back."""
    if not is_gcs(path):
        return open(path, "rb")
    blob = _blob(path)
    try:
        blob.reload(retry=_retry())
    except _not_found() as e:
        raise FileNotFoundError(path) from e
    return blob.open("rb", chunk_size=8 * _CHUNK, retry=_retry())


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
    if not is_gcs(path):
        _atomic_local(path, lambda f: f.write(data))
        return
    # Explicit retry: uploads without if_generation_match are not retried by
    # default, but ours are idempotent overwrites.
    _blob(path).upload_from_string(data, retry=_retry(retry_timeout))


def write_text(path: str, text: str) -> None:
    """Writes `text` as UTF-8 to `path` (atomically when local)."""
    write_bytes(path, text.encode("utf-8"))


def stat(path: str) -> tuple[int, str]:
    """(size in bytes, version): the modification time (ns) of a local file, the
    generation of a gs:// object (every overwrite makes a new one). No content is read."""
    if not is_gcs(path):
        info = os.stat(path)
        return info.st_size, str(info.st_mtime_ns)
    bucket, name = _split(path)
    blob = _client().bucket(bucket).get_blob(name, retry=_retry())
    if blob is None:
        raise FileNotFoundError(path)
    return int(blob.size), str(blob.generation)


def size(path: str) -> int:
    """Returns the size of a file or object in bytes."""
    return stat(path)[0]


def fingerprint(path: str) -> str:
    """A string that changes whenever the file's content may have changed (size, version)."""
    return ":".join(map(str, stat(path)))


def delete(path: str) -> None:
    """Deletes one file or object; a missing one is not an error."""
    if not is_gcs(path):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        return
    try:
        _blob(path).delete(retry=_retry())
    except _not_found():
        pass


def delete_prefix(path: str) -> None:
    """Deletes a folder: a local tree or every object under `path`/."""
    if not is_gcs(path):
        if os.path.isdir(path):
            shutil.rmtree(path)
        return
    for blob in list(_list(_folder(path))):
        try:
            blob.delete(retry=_retry())
        except _not_found():
            pass


def listdir(path: str) -> list[str]:
    """Returns the sorted names of the files and folders directly in `path`.

    A missing folder gives [] (for gs:// an empty folder cannot exist anyway).
    """
    if not is_gcs(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    folder = _folder(path)
    _, prefix = _split(folder)
    it = _list(folder, delimiter="/")
    names = {b.name[len(prefix) :] for b in it}  # Consuming `it` fills `it.prefixes`.
    names.update(p[len(prefix) :].rstrip("/") for p in it.prefixes)
    names.discard("")
    return sorted(names)


def _gcs_glob(pattern: str) -> tuple[set[str], set[str]]:
    """Returns (objects, folders) matching `pattern`, segment by segment like glob.glob."""
    bucket, name_pattern = _split(pattern)
    cut = min([i for i in map(name_pattern.find, _WILDCARDS) if i >= 0] + [len(name_pattern)])
    segments = name_pattern.split("/")
    files, folders = set(), set()
    for blob in _list(f"{_GS}{bucket}/{name_pattern[:cut]}"):
        parts = blob.name.split("/")
        if len(parts) < len(segments):
            continue
        head = parts[: len(segments)]
        # '*' must not cross '/', as with local glob, so match each segment.
        if all(fnmatch.fnmatchcase(p, s) for p, s in zip(head, segments)):
            matched = f"{_GS}{bucket}/" + "/".join(head)
            (files if len(parts) == len(segments) else folders).add(matched)
    return files, folders - files


def glob(pattern: str) -> list[str]:
    """Returns the sorted paths matching a pattern with * ? [..] wildcards.

    A pattern without wildcards gives [pattern] if it exists, else [].
    """
    if not any(c in pattern for c in _WILDCARDS):
        return [pattern] if exists(pattern) else []
    if not is_gcs(pattern):
        return sorted(_glob.glob(pattern))
    files, folders = _gcs_glob(pattern)
    return sorted(files | folders)


def _is_dir(path: str) -> bool:
    if not is_gcs(path):
        return os.path.isdir(path)
    return not _blob(path).exists(retry=_retry())


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
        if is_gcs(pattern) and any(c in pattern for c in _WILDCARDS):
            matches = sorted(_gcs_glob(pattern)[0])
        else:
            matches = [m for m in glob(pattern) if not _is_dir(m)]
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
    if not is_gcs(src) and not is_gcs(dst):
        with open(src, "rb") as f_in:
            _atomic_local(dst, lambda f_out: shutil.copyfileobj(f_in, f_out, _CHUNK))
        return
    retry = _retry(retry_timeout)
    if not is_gcs(src):
        if not os.path.isfile(src):
            raise FileNotFoundError(src)
        _blob(dst).upload_from_filename(src, retry=retry)
    elif not is_gcs(dst):
        try:
            _atomic_local(dst, lambda f: _blob(src).download_to_file(f, retry=retry))
        except _not_found() as e:
            raise FileNotFoundError(src) from e
    else:
        src_blob, dst_blob = _blob(src), _blob(dst)
        token = None
        try:
            # rewrite() may need several calls for large or cross-region objects.
            while True:
                token, _, _ = dst_blob.rewrite(src_blob, token=token, retry=retry)
                if token is None:
                    break
        except _not_found() as e:
            raise FileNotFoundError(src) from e


def upload_dir(local_dir: str, remote_dir: str) -> list[str]:
    """Copies every file under `local_dir` (recursively) to `remote_dir`.

    Args:
        local_dir: a local directory.
        remote_dir: a gs:// or local destination folder.

    Returns:
        The destination paths, in sorted walk order.
    """
    out = []
    for root, dirs, files in os.walk(local_dir):
        dirs.sort()
        for name in sorted(files):
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).split(os.sep)
            dst = join(remote_dir, *rel)
            copy_file(src, dst)
            out.append(dst)
    return out


def md5_file(local_path: str) -> str:
    """Returns the base64 MD5 of a local file, as GCS reports it in md5Hash."""
    digest = hashlib.md5()
    with open(local_path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode("ascii")
