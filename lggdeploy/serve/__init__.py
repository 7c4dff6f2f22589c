"""Serving past one process on Triton Inference Server: `lggdeploy serve` (tritonserver on a repository of
Python-backend models, server.py) and `lggdeploy triton-repo` (a model repository for a stock Triton server,
repository.py), both running the one implementation of what a request computes (handlers.py). Torch-free; the
tritonserver binary (in NVIDIA PyTriton's wheel) and tritonclient come with the `serve` extra.
"""
