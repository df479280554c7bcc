"""Ponder exporters: ONNX graphs (and their onnxruntime executor), Hugging Face format, the vLLM plugin."""
