"""The edge runtime: Segmenter (engine -> masks) and predict (files -> masks, overlays, volumes).

Torch-free (numpy, Pillow, tifffile, onnxruntime; tensorrt + cuda-python for .plan engines): an edge scanner
embeds this package. A test imports it in a fresh interpreter and fails if torch or smp come along.
"""

from lggdeploy.postprocess import PostProcess
from lggdeploy.runtime.segmenter import Prediction, Segmenter
from lggdeploy.scoring import largest_connected_component

__all__ = ["PostProcess", "Prediction", "Segmenter", "largest_connected_component"]
