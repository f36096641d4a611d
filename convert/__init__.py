"""Model conversion: pycls / EfficientNet-Lite checkpoints -> verified ONNX -> .om."""
