"""The google-cloud-storage side of trainer.storage: the client and parsed gs:// paths.

The client is created lazily on first use (so local-only runs never load cloud
auth), once per process and emulator: with STORAGE_EMULATOR_HOST set it talks to
that emulator anonymously, otherwise it uses Application Default Credentials.
With TRAINER_REQUIRE_EMULATOR=1 (the tests) it refuses to build a real client.

A gs:// path is parsed once, by `parse`, into a `GcsPath` (bucket, name) whose
methods do the object lookups.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any

from trainer.errors import UserError

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
    """The process's Cloud Storage client, built on first use.

    Returns:
      The google.cloud.storage.Client for this process and STORAGE_EMULATOR_HOST
      (a fork or a moved emulator gets a new one).

    Raises:
      RuntimeError: with TRAINER_REQUIRE_EMULATOR=1, if the client would not talk
        to an emulator on 127.0.0.1 or localhost.
    """
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
    """The library's default retry policy, optionally with a deadline.

    Args:
      timeout: seconds after which retrying stops; None keeps the library's own.

    Returns:
      A google.api_core Retry to pass as `retry=`.
    """
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY if timeout is None else DEFAULT_RETRY.with_timeout(timeout)


def not_found() -> type[Exception]:
    """The exception a missing object raises.

    Returns:
      google.api_core.exceptions.NotFound (imported here, on first gs:// use).
    """
    from google.api_core.exceptions import NotFound

    return NotFound


def parse(path: str) -> GcsPath | None:
    """Parses a gs:// path once, so that no later step splits the string again.

    Args:
      path: a gs://bucket/name path or a local path.

    Returns:
      The bucket and object name for a gs:// path (name "" for `gs://bucket` and
      `gs://bucket/`), or None for a local path.

    Raises:
      UserError: for a gs:// path without a bucket, such as `gs://` or `gs:///x`.
    """
    if not path.startswith(GS):
        return None
    bucket, _, name = path[len(GS) :].partition("/")
    if not bucket:
        raise UserError(f"no bucket name in the Cloud Storage path {path!r}")
    return GcsPath(bucket, name)


@dataclass(frozen=True)
class GcsPath:
    """A parsed gs://bucket/name: an object, or a name prefix standing for a folder.

    Attributes:
      bucket: the bucket name, never empty.
      name: the object name or prefix inside the bucket; "" for the whole bucket.
    """

    bucket: str
    name: str

    def __str__(self) -> str:
        """The gs:// form; the bucket itself reads `gs://bucket/`."""
        return f"{GS}{self.bucket}/{self.name}"

    def folder(self) -> GcsPath:
        """This path as a folder prefix, so that `a` does not also match `ab`.

        Returns:
          The same path with a name ending in '/'; the whole bucket keeps the
          name "" (every object name would miss a prefix of "/").
        """
        if not self.name or self.name.endswith("/"):
            return self
        return GcsPath(self.bucket, self.name + "/")

    def child(self, *parts: str) -> GcsPath:
        """The path of `parts` below this one, joined with '/'.

        Args:
          *parts: name components, e.g. ("ckpt", "w.h5").

        Returns:
          A path in the same bucket.
        """
        return GcsPath(self.bucket, posixpath.join(self.name, *parts))

    def bucket_ref(self) -> Any:
        """The google.cloud.storage Bucket of this path (not fetched)."""
        return client().bucket(self.bucket)

    def blob(self, generation: int | None = None) -> Any:
        """The google.cloud.storage Blob at this path (not fetched); with a generation,
        reads of it ask for that generation and find nothing once it is replaced."""
        return self.bucket_ref().blob(self.name, generation=generation)

    def get_blob(self) -> Any:
        """Fetches the object's metadata, with retries.

        Returns:
          The Blob with its size and generation filled in, or None if there is
          no object at this path.
        """
        return self.bucket_ref().get_blob(self.name, retry=retry())

    def list_blobs(self, delimiter: str | None = None) -> Any:
        """Lists the objects whose names start with this path's name, with retries.

        Args:
          delimiter: "/" to list one level only; the iterator's `prefixes` then
            holds the sub-folders once it has been consumed.

        Returns:
          The library's iterator of Blobs.
        """
        return client().list_blobs(
            self.bucket, prefix=self.name, delimiter=delimiter, retry=retry()
        )

    def glob(self) -> tuple[set[str], set[str]]:
        """Matches this path's name as a pattern, segment by segment like glob.glob.

        Returns:
          (objects, folders): the gs:// paths of the objects that match, and of
          the folders that match but are not also objects.
        """
        cut = min([i for i in map(self.name.find, WILDCARDS) if i >= 0] + [len(self.name)])
        segments = self.name.split("/")
        files, folders = set(), set()
        # Only the part before the first wildcard can narrow the listing.
        for item in GcsPath(self.bucket, self.name[:cut]).list_blobs():
            parts = item.name.split("/")
            if len(parts) < len(segments):
                continue
            head = parts[: len(segments)]
            # '*' must not cross '/', as with local glob, so match each segment.
            if all(fnmatch.fnmatchcase(p, s) for p, s in zip(head, segments)):
                matched = str(GcsPath(self.bucket, "/".join(head)))
                (files if len(parts) == len(segments) else folders).add(matched)
        return files, folders - files
