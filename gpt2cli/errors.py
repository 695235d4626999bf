"""The one exception the CLI turns into a one-line message and exit code 2."""


class Gpt2Error(Exception):
    """A user-facing failure: bad input, a missing file, no network. The message is one line."""
