"""`python -m bench bench list|run ...` and the shorter `python -m bench list|run ...`."""

import sys

from bench.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] != ["bench"]:
        argv = ["bench", *argv]
    sys.exit(main(argv))
