"""The one exception type that means "the user asked for something we cannot do".

Entrypoints catch `UserError` and print its message as a single line before
exiting non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a flag value, a data pattern, a job directory. One-line message."""
