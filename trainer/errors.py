"""What a failure looks like to the user: one line, then a non-zero exit.

`UserError` means "the user asked for something we cannot do". Entrypoints print
its message as a single line. Failures of the environment (a folder that cannot
be written, missing cloud credentials, a bucket that refuses a request) get one
line too, via `environment_message`, with the traceback kept for `-v=1`;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
import sys

from absl import logging

CREDENTIALS_HINT = ("run `gcloud auth application-default login` or set "
                    "GOOGLE_APPLICATION_CREDENTIALS; on Vertex AI the job's service account "
                    "provides them")


class UserError(Exception):
    """Bad input: a flag value, a data pattern, a job directory. One-line message."""


class StoppedError(Exception):
    """The work was stopped on request (a signal) after saving what it had.

    Entrypoints log the message and exit with `exit_code`, 128 + the signal's number
    as shells report it (143 for SIGTERM, 130 for Ctrl-C).
    """

    def __init__(self, message: str, signal_name: str = "SIGTERM"):
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = 130 if signal_name == "SIGINT" else 143


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def environment_message(err: BaseException) -> str | None:
    """A one-line description of `err` if the environment caused it, else None.

    Covers OSError (permissions, missing folders, a full disk, lost connections),
    Google auth errors and Cloud Storage API errors. The google modules are looked up
    only if already imported: an error cannot be of a type that was never loaded.
    """
    if isinstance(err, OSError):
        return _first_line(err)
    auth = sys.modules.get("google.auth.exceptions")
    if auth is not None and isinstance(err, auth.DefaultCredentialsError):
        return f"no Google Cloud credentials for gs:// paths ({CREDENTIALS_HINT})"
    if auth is not None and isinstance(err, auth.GoogleAuthError):
        return f"Google Cloud credentials failed: {_first_line(err)} ({CREDENTIALS_HINT})"
    api = sys.modules.get("google.api_core.exceptions")
    if api is not None and isinstance(err, api.GoogleAPICallError):
        return f"Cloud Storage refused a request: {_first_line(err)}"
    if api is not None and isinstance(err, api.RetryError):
        return f"Cloud Storage did not answer in time: {_first_line(err)[:200]}"
    return None


def _from_the_pipeline(err: BaseException) -> str | None:
    """The message of a UserError raised inside a tf.data pipeline's Python code, which
    TensorFlow hands on as an op error that quotes it; None for any other error."""
    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(err, tf.errors.OpError):
        return None
    found = re.search(r"\bUserError: (.+)", err.message)
    return found.group(1).strip() if found else None


def describe(err: Exception) -> str | None:
    """The one line an entrypoint prints for `err`; None for a bug (re-raise it then)."""
    if isinstance(err, UserError):
        return str(err)
    message = environment_message(err) or _from_the_pipeline(err)
    if message is not None:
        logging.debug("traceback of the error below", exc_info=err)
    return message
