"""Backends behind one Runner protocol; see base.py. Importing this package imports no backend library."""

from lggdeploy.backends.base import BACKENDS, Runner, availability, load_runner

__all__ = ["BACKENDS", "Runner", "availability", "load_runner"]
