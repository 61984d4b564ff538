"""Running models: perplexity evaluation, CPU engines (ONNX Runtime, DeepSparse) and ``losa bench``."""
