"""Operations: configuration file, health and metrics endpoint, ONNX export."""
