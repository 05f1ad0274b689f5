"""The one exception type for bad input from outside (files, names, flags).

Command-line tools print its message as a single line and exit non-zero; everything else is a
bug and keeps its traceback.
"""


class InputError(ValueError):
    """Untrusted input that cannot be used: the message says what and why, in one line."""


class UnreadableImage(InputError):
    """One image (or record) that cannot be used: which one and why, apart, so that reports
    that name the image already can give the reason alone."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(name, reason)
        self.name, self.reason = name, reason

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


def reason_of(err: BaseException) -> str:
    """Why an item failed, without its name when the error keeps them apart."""
    if isinstance(err, UnreadableImage):
        return err.reason
    return str(err) or type(err).__name__
