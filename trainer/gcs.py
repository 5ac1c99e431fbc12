"""The google-cloud-storage side of trainer.storage: the client and object lookups.

The client is created lazily on first use (so local-only runs never load cloud
auth), once per process and emulator: with STORAGE_EMULATOR_HOST set it talks to
that emulator anonymously, otherwise it uses Application Default Credentials.
With TRAINER_REQUIRE_EMULATOR=1 (the tests) it refuses to build a real client.
"""

from __future__ import annotations

import fnmatch
import os
import threading
import urllib.parse
from typing import Any

GS = "gs://"
WILDCARDS = "*?["

# (pid, emulator host, client): rebuilt after fork or when the emulator moves.
_client_cache: tuple[int, str | None, Any] | None = None
_client_lock = threading.Lock()


def reset_client() -> None:
    """Drops the cached client, e.g. after STORAGE_EMULATOR_HOST changed."""
    global _client_cache
    with _client_lock:
        _client_cache = None


def client() -> Any:
    """The process's google.cloud.storage.Client (for this STORAGE_EMULATOR_HOST)."""
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


def retry(timeout: float | None = None) -> Any:
    """The library's default retry, with a deadline of `timeout` seconds if given."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY if timeout is None else DEFAULT_RETRY.with_timeout(timeout)


def not_found() -> type[Exception]:
    """The exception a missing object raises."""
    from google.api_core.exceptions import NotFound

    return NotFound


def split(path: str) -> tuple[str, str]:
    """gs://bucket/name -> (bucket, name)."""
    bucket, _, name = path[len(GS) :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {path!r}")
    return bucket, name


def blob(path: str) -> Any:
    """The Blob at a gs:// path (not fetched)."""
    bucket, name = split(path)
    return client().bucket(bucket).blob(name)


def list_blobs(prefix_path: str, delimiter: str | None = None) -> Any:
    """The objects under a gs://bucket/prefix, with retries."""
    bucket, prefix = split(prefix_path)
    return client().list_blobs(bucket, prefix=prefix, delimiter=delimiter, retry=retry())


def glob(pattern: str) -> tuple[set[str], set[str]]:
    """Returns (objects, folders) matching `pattern`, segment by segment like glob.glob."""
    bucket, name_pattern = split(pattern)
    cut = min([i for i in map(name_pattern.find, WILDCARDS) if i >= 0] + [len(name_pattern)])
    segments = name_pattern.split("/")
    files, folders = set(), set()
    for item in list_blobs(f"{GS}{bucket}/{name_pattern[:cut]}"):
        parts = item.name.split("/")
        if len(parts) < len(segments):
            continue
        head = parts[: len(segments)]
        # '*' must not cross '/', as with local glob, so match each segment.
        if all(fnmatch.fnmatchcase(p, s) for p, s in zip(head, segments)):
            matched = f"{GS}{bucket}/" + "/".join(head)
            (files if len(parts) == len(segments) else folders).add(matched)
    return files, folders - files
