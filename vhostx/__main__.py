"""`python -m vhostx` is the `vhostx` command."""

import sys

from .cli import main

sys.exit(main())
