"""Precision lives in the ONNX graph (TensorRT 11 style): a typed FP16 graph, or Q/DQ nodes for INT8."""
