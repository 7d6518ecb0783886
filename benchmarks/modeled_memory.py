"""``python benchmarks/modeled_memory.py``: print only the modeled GPU section of the harness (modeled
peak memory under FakeTensorMode + MemTracker, bytes moved per token, H100 bounds); see
benchmarks/modeled.py."""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import modeled

    print(modeled.run()["markdown"])
