"""Serving past one process on Triton Inference Server: `lggdeploy serve` (PyTriton, server.py) and `lggdeploy
triton-repo` (a model repository for a stock Triton server, repository.py), both running the one implementation of
what a request computes (handlers.py). Torch-free; PyTriton and tritonclient come with the `serve` extra.
"""
