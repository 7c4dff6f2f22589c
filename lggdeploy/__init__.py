"""lggdeploy: brain-MRI low-grade glioma segmentation, from training to deployable engines.

Importing the package is cheap: torch, smp and onnxruntime are imported by the modules that use them.
"""

__version__ = "0.1.0"
