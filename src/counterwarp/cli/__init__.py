"""Command-line interface: parse arguments, call the Python API, print where things went.

Kept thin on purpose: every command maps onto one workflow function (:mod:`.commands`), the
options live in :mod:`.parser`. User errors (:class:`counterwarp.errors.CounterwarpError`)
and file-system errors (:class:`OSError`) print one line on stderr and exit with 2.
"""

from __future__ import annotations

import re
import sys

from counterwarp.cli.commands import _fit_settings
from counterwarp.cli.parser import EXAMPLES, build_parser
from counterwarp.errors import CounterwarpError

__all__ = ["EXAMPLES", "_fit_settings", "build_parser", "main", "one_line"]


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(message: str) -> str:
    """``message`` as a single terminal line: no ANSI escapes, line breaks become spaces."""
    parts = _ANSI_ESCAPE.sub("", message).splitlines()
    return " ".join(part.strip() for part in parts if part.strip())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``counterwarp`` console script; returns the exit status.

    A user error (:class:`CounterwarpError`) or a file-system error (:class:`OSError`: a
    path through a file, a full disk, no permission) prints one line on stderr and returns 2.
    """
    from counterwarp._io.provenance import set_command_line

    parser = build_parser()
    args = parser.parse_args(argv)
    set_command_line(list(sys.argv[1:] if argv is None else argv))
    try:
        args.func(args)
    except CounterwarpError as error:
        print(f"counterwarp {args.command}: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        reason = error.strerror or str(error)
        print(f"counterwarp {args.command}: error: {one_line(where + reason)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"counterwarp {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0

