"""User-facing errors.

Every problem a user can fix (a bad file, a bad argument, a bad manifest row, a tensor of
the wrong shape handed to a public function) raises :class:`CounterwarpError` with a
message that names the culprit and says what to do. The command-line interface prints that
message on one line and exits with status 2.
"""


class CounterwarpError(ValueError):
    """An error caused by the user's input, with a message that says how to fix it.

    It is a :class:`ValueError`, so code that already catches ``ValueError`` around a
    public function keeps working.
    """
