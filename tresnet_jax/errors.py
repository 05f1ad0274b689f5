"""The one exception type for bad input from outside (files, names, flags).

Command-line tools print its message as a single line and exit non-zero; everything else is a
bug and keeps its traceback.
"""


class InputError(ValueError):
    """Untrusted input that cannot be used: the message says what and why, in one line."""
