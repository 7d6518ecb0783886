"""``python benchmarks/run.py [flags]``: an alias of ``python -m benchmarks [flags]`` (see benchmarks/cli.py)."""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.cli import main

    sys.exit(main())
