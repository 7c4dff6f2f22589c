"""PyTorch models: presets, networks (smp + trimming), checkpoints, training, pruning, evaluation, the FP32
reference runner. Importing this package imports nothing heavy; its modules import torch."""
