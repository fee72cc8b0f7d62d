"""Inference: preparing a model, test-time modes (whole / slide / multi-scale + flip), prediction
writers, ONNX export and benchmarks."""
