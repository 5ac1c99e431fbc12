"""What the entrypoints share: argv parsing with one-line errors and help.

Each entrypoint (task, generate, export, serve) passes `flags_parser(...)` to
`absl.app.run`: a flag error prints one `error: ...` line and exits 2, and
`--help`/`--helpshort`/`--helpfull` exit 0 after printing the help (absl's own
help flags exit 1, which reads as a failure to scripts and CI).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags

from trainer.errors import UserError

HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "h", "?")


def say(message: str) -> None:
    """A note or error line for the user, on stderr."""
    print(message, file=sys.stderr, flush=True)


def asks_for_help(argv: list[str]) -> bool:
    return any(arg.lstrip("-").split("=")[0] in HELP_FLAGS for arg in argv[1:]
               if arg.startswith("-"))


def parse_argv(argv: list[str], rewrite: Callable[[list[str]], list[str]] | None = None,
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


def flags_parser(rewrite: Callable[[list[str]], list[str]] | None = None
                 ) -> Callable[[list[str]], list[str]]:
    """`parse_argv` as the `flags_parser` argument of `absl.app.run`."""
    return lambda argv: parse_argv(argv, rewrite)
