"""Using a trained student: export (ONNX, TorchScript)."""
