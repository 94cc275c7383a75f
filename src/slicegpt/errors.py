"""The one exception type the CLI turns into a one-line error message."""


class SliceGPTError(Exception):
    """A problem the user can fix (bad input, missing file, unsupported model).

    The message is a complete sentence meant to be shown as-is, without a traceback.
    `shared`: every rank of a distributed job raised this same error, so rank 0 alone shows it.
    """

    def __init__(self, message: str = "", shared: bool = False) -> None:
        super().__init__(message)
        self.shared = shared


class SliceGPTWarning(UserWarning):
    """A setting that runs but may not do what the user expects; the CLI shows it as one line."""
