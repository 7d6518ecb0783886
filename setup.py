"""Build script. The package is pure Python today; native extensions (csrc/) hook in here."""

from setuptools import setup

setup()
