"""User-facing errors.

Every problem a user can fix (a bad file, a bad argument, a bad manifest row) raises
:class:`CounterwarpError` with a message that names the culprit and says what to do.
The command-line interface prints that message on one line and exits non-zero.
"""


class CounterwarpError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""
