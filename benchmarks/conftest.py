"""The micro-benchmarks run only with ``pytest benchmarks/ --benchmark-only`` (pytest-benchmark).

CI's ``python -m pytest -q`` collects only ``tests/`` (pyproject's testpaths); should benchmarks/ be
collected anyway (``pytest benchmarks/`` without the flag), every benchmark is skipped, not run.
"""

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        benchmark_only = bool(config.getoption("benchmark_only"))
    except ValueError:  # pytest-benchmark not installed: the option does not exist
        benchmark_only = False
    if benchmark_only:
        return
    skip = pytest.mark.skip(reason="micro-benchmark: run `pytest benchmarks/ --benchmark-only` (pytest-benchmark)")
    for item in items:
        item.add_marker(skip)
