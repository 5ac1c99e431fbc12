"""The doors' one shared main: flags, one call, and one way to end.

Every entrypoint (task, generate, evaluate, export, serve, corpus) is its flags and a
`run(flags) -> exit status`, started by `main(define_flags, run)`:

- a flag error prints one `error: ...` line and exits 2; `--help`, `--helpshort`,
  `--helpfull` and `--helpxml` exit 0 after the help (absl's own exit 1, which reads
  as a failure to scripts and CI);
- bad input or a failing environment (`errors.describe`) prints one `error: ...`
  line and exits 1; a job stopped by a signal (`errors.StoppedError`) exits 128 + the
  signal's number after its one line; a reader that went away (`| head`) ends quietly;
- on any non-zero exit the process ends right after the atexit handlers ran, so no
  library object torn down at interpreter exit (a `multiprocessing` pool whose peer
  died, say) can print a traceback under that one line, and a stopped job does not
  wait on its input pipeline's threads to end.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable

# Before anything imports TensorFlow: its C++ INFO lines are noise for a command line.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from trainer.errors import StoppedError, UserError, describe  # noqa: E402

HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "h", "?")
Rewrite = Callable[[list[str]], list[str]]

# The exception that ended the last failed or stopped run. Its traceback holds the job's
# frames and, through them, its tf.data iterators; releasing those blocks the main thread
# (holding the GIL) on pipeline threads that wait for the GIL in a generator, for up to a
# minute. Kept here, they are never released: `finish` ends the process first.
_ended_by: BaseException | None = None


def say(message: str) -> None:
    """A note or error line for the user, on stderr."""
    print(message, file=sys.stderr, flush=True)


def asks_for_help(argv: list[str]) -> bool:
    return any(arg.lstrip("-").split("=")[0] in HELP_FLAGS for arg in argv[1:]
               if arg.startswith("-"))


def parse_argv(argv: list[str], rewrite: Rewrite | None = None,
               flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Parses argv into `flag_values`; exits 2 with one line on bad flags, 0 after help.

    Args:
      argv: the full command line (argv[0] is the program).
      rewrite: turns argv into what absl parses (presets, legacy spellings); may
        raise UserError.
      flag_values: where the flags are defined.

    Returns:
      The arguments absl left over (argv[0] first).
    """
    try:
        return flag_values(rewrite(list(argv)) if rewrite else list(argv))
    except (flags.Error, UserError) as err:
        say(f"error: {str(err).splitlines()[0]} (see --helpshort)")
        sys.exit(2)
    except SystemExit:
        # absl exits 1 after printing --help/--helpshort/--helpfull; asking for help succeeded.
        if asks_for_help(argv):
            sys.exit(0)
        raise


def run_door(argv: list[str], run: Callable[[flags.FlagValues], int | None],
             flag_values: flags.FlagValues = flags.FLAGS) -> int:
    """Runs a door's `run` on the parsed `flag_values`; returns the exit status.

    Args:
      argv: what absl left of the command line (argv[0] first); more is an error.
      run: the door's work; returns None or an exit status.
      flag_values: the parsed flags handed to `run`.
    """
    if len(argv) > 1:
        say(f"error: unexpected arguments: {' '.join(argv[1:])} (see --helpshort)")
        return 2
    global _ended_by
    try:
        return run(flag_values) or 0
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away; stop quietly, as command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except StoppedError as stop:
        logging.warning("%s", stop)
        _ended_by = stop
        return stop.exit_code
    except Exception as err:
        message = describe(err)
        if message is None:
            raise  # A bug: keep its traceback.
        say(f"error: {message}")
        _ended_by = err
        return 1


def finish(status: int) -> None:
    """Ends the process with `status`.

    A failure ends here, not at interpreter exit: the atexit handlers (uploads, temp
    folders) run, the streams are flushed, and the process leaves before the
    interpreter tears down library objects, whose finalizers may print tracebacks
    (a collective's `multiprocessing` pool after its peer died) under the one line
    the user needs.
    """
    if not status:
        sys.exit(0)
    atexit._run_exitfuncs()
    logging.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def main(define_flags: Callable[[], None], run: Callable[[flags.FlagValues], int | None],
         rewrite: Rewrite | None = None) -> None:
    """A door's `if __name__ == "__main__"` body: define the flags, parse, run, finish."""
    define_flags()
    app.run(lambda argv: finish(run_door(argv, run)),
            flags_parser=lambda argv: parse_argv(argv, rewrite))
