"""Export: merged safetensors and verified ONNX graphs (``losa export``)."""
