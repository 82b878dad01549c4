"""Export and deployment: ONNX export with parity checks, INT8 quantisation, inference benchmarks."""
