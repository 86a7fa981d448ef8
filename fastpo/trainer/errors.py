"""The one exception type for user mistakes (bad paths, malformed data, unknown names).

``fastpo train`` prints its message and exits with status 2, without a traceback; anything else
that escapes is a bug in fastpo and keeps its traceback."""


class UserInputError(ValueError):
    """A user-facing error: the message says what was wrong and where (file, line, flag)."""
