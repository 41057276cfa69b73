"""Build script for headsparse.

The pure-Python package (torch reference + Triton kernels) always installs. The
compiled extension (``csrc/``) is added by the extension issue; until then this
file only declares the package so that ``pip install -e .`` works everywhere.
"""
from setuptools import setup

setup()
