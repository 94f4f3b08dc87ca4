"""Explanation-enabled model export: ONNX and OpenVINO models that return a ViT's predictions and
its ViT-ReciproCAM maps from one graph, evaluated the reduced way (about one forward's cost)."""
