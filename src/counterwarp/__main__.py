"""``python -m counterwarp`` (and ``torchrun -m counterwarp``): the command-line interface."""

import sys

from counterwarp.cli import main

sys.exit(main())
