"""The one exception type for user mistakes.

Anything the user can fix (a config key, a path, a dataset name, a malformed record) raises
``UserError`` with a one-line message naming the input, what was wrong and what is accepted.
Entry points print it as ``error: <message>`` and exit with status 2, without a traceback.
"""

import difflib


class UserError(Exception):
    """A mistake in the user's input, reported as one line."""


def closest(name: str, candidates) -> str:
    """`` (did you mean 'x'?)`` for the nearest candidate, or an empty string."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
