"""ONNX export of the static parts and an onnxruntime-backed runner."""
