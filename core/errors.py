"""One exception type for every user-facing error.

The CLI catches `WsgError`, prints its message (which must name the field,
file or value at fault and say what to do) and exits with code 2 without a
traceback. Anything else is a bug and keeps its traceback.
"""


class WsgError(Exception):
    """A problem with the user's input or environment, stated so they can fix it."""


class ConfigError(WsgError):
    """A config file is invalid; the message names the key path."""
