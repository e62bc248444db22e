"""The one exception type for mistakes a user can fix (bad config, unknown name, missing file).

The CLI prints its message as one sentence and exits with status 2; anything else is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
    """Bad input from the user: the message says what is wrong and what would be valid."""


def unknown_name(kind: str, name: str, valid) -> UserInputError:
    return UserInputError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")


class NonFiniteError(RuntimeError):
    """A loss, reward or gradient norm became NaN/inf; the run stops and keeps its last good checkpoint."""
