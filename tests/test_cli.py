"""Tests for trainer.cli, the doors' one main: exit statuses, one-line errors, and no
traceback from interpreter teardown after a failure's line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from absl import flags

from trainer import cli
from trainer.errors import StoppedError, UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _door(body: str, *argv: str) -> subprocess.CompletedProcess:
    """Runs a tiny door built on cli.main in a fresh interpreter."""
    code = textwrap.dedent("""
        from absl import flags
        from trainer import cli

        def define_flags():
            flags.DEFINE_string("what", "ok", "what to do")

        {body}

        if __name__ == "__main__":
            cli.main(define_flags, run)
    """).format(body=textwrap.indent(textwrap.dedent(body), "").strip())
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": REPO})


def test_statuses_and_one_line_errors(tmp_path):
    values = flags.FlagValues()

    def fails(error):
        def run(fv):
            raise error
        return run

    assert cli.run_door(["door"], lambda fv: None, values) == 0
    assert cli.run_door(["door"], lambda fv: 3, values) == 3
    assert cli.run_door(["door", "extra"], lambda fv: None, values) == 2
    assert cli.run_door(["door"], fails(UserError("bad --x")), values) == 1
    assert cli.run_door(["door"], fails(FileNotFoundError(2, "No such file", "f")), values) == 1
    assert cli.run_door(["door"], fails(StoppedError("stopped", "SIGTERM")), values) == 143
    assert cli.run_door(["door"], fails(StoppedError("stopped", "SIGINT")), values) == 130
    with pytest.raises(ZeroDivisionError):  # A bug keeps its traceback.
        cli.run_door(["door"], fails(ZeroDivisionError()), values)


def test_a_failure_ends_with_its_line_and_no_teardown_traceback():
    # An object whose finalizer fails at interpreter exit, as a collective's thread pool
    # can after its peer died: the user sees the error line, not the finalizer's noise.
    body = """
        class Leftover:
            def __del__(self):
                raise OSError(9, "Bad file descriptor")

        LEFTOVER = Leftover()

        def run(fv):
            import atexit
            atexit.register(lambda: print("atexit ran", flush=True))
            if fv.what == "fail":
                raise OSError(28, "No space left on device")
    """
    failed = _door(body, "--what=fail")
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.splitlines() == ["error: [Errno 28] No space left on device"]
    assert failed.stdout == "atexit ran\n"  # Cleanups registered with atexit still run.
    # The same object does print at a normal exit: the check above can fail.
    ok = _door(body)
    assert ok.returncode == 0 and "Exception ignored" in ok.stderr


def test_a_stopped_run_ends_without_tearing_down_its_frames():
    # A stopped job's frames hold its tf.data iterators, whose teardown can wait on
    # pipeline threads for up to a minute: the process ends before releasing them.
    body = """
        class Pipeline:
            def __del__(self):
                print("released", flush=True)

        def run(fv):
            from trainer.errors import StoppedError
            pipeline = Pipeline()
            if fv.what == "stop":
                raise StoppedError("stopped by SIGTERM at step 3", "SIGTERM")
    """
    stopped = _door(body, "--what=stop")
    assert stopped.returncode == 143, stopped.stderr
    assert "stopped by SIGTERM at step 3" in stopped.stderr
    assert "released" not in stopped.stdout
    # Without a stop the frame ends as usual: the check above can fail.
    assert _door(body).stdout == "released\n"


def test_flag_errors_and_help():
    body = """
        def run(fv):
            print(fv.what)
    """
    assert _door(body, "--what=x").stdout == "x\n"
    bad = _door(body, "--nope=1")
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        "error: Unknown command line flag 'nope' (see --helpshort)"]
    extra = _door(body, "surplus")
    assert extra.returncode == 2
    assert extra.stderr.splitlines() == ["error: unexpected arguments: surplus (see --helpshort)"]
    helped = _door(body, "--helpshort")
    assert helped.returncode == 0 and "--what" in helped.stdout + helped.stderr
