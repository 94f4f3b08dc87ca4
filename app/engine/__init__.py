"""Pure PyTorch engine: model loading, preprocessing and ViT-ReciproCAM. Imports nothing from the server.

Nothing is imported here, so that reading a vocabulary (``app.engine.options``) does not load torch:
the server process of ``serve --workers N`` only supervises.
"""
