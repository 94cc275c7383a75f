"""The one exception type the CLI turns into a one-line error message."""


class SliceGPTError(Exception):
    """A problem the user can fix (bad input, missing file, unsupported model).

    The message is a complete sentence meant to be shown as-is, without a traceback.
    """
