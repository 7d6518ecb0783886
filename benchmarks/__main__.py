"""``python -m benchmarks``: the benchmark harness (see benchmarks/cli.py, ``--help``)."""

import sys

from benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
