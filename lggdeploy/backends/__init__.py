"""Deployment backends behind one Runner protocol (base.py); one module per backend. Importing this package
imports no backend library."""

from lggdeploy.backends.base import BACKENDS, BuildTarget, Runner, RunOptions, availability, backend_module

__all__ = ["BACKENDS", "BuildTarget", "Runner", "RunOptions", "availability", "backend_module"]
