"""The one error type users see: its message is a single line that names the thing at fault."""


class GptbcError(Exception):
    """A user-facing failure (bad input, missing file, unsupported option).

    The CLI prints ``error: <message>`` and exits with status 1; anything else is a bug and
    keeps its traceback.
    """
