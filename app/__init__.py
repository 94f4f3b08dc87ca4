"""ViT-ReciproCAM explanation service: timm Vision Transformer predictions with saliency maps."""

__version__ = "0.1.0"
