"""``python benchmarks/fused_linear.py [flags]``: an alias of ``python -m benchmarks --workloads lm_head
[flags]``, the fused LM head (matmul included) against the naive matmul + reference and the peers."""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.cli import main

    sys.exit(main(["--workloads", "lm_head", *sys.argv[1:]]))
