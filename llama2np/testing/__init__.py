"""Torch-free checkpoint writers for tests and benchmarks: .pth and safetensors, synthetic checkpoints, GGUF."""
