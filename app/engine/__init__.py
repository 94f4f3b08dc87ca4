"""Pure PyTorch engine: model loading, preprocessing and ViT-ReciproCAM. Imports nothing from the server."""

from app.engine.masks import mask_matrix, mask_supports
from app.engine.models import LoadedModel, ModelLoadError, load_model
from app.engine.preprocess import DataConfig, Geometry, Preprocessor, project_to_original
from app.engine.reciprocam import CamOptions, ImageExplanation, ReciproCAM, normalize_maps, upsample_maps

__all__ = [
    "CamOptions",
    "DataConfig",
    "Geometry",
    "ImageExplanation",
    "LoadedModel",
    "ModelLoadError",
    "Preprocessor",
    "ReciproCAM",
    "load_model",
    "mask_matrix",
    "mask_supports",
    "normalize_maps",
    "project_to_original",
    "upsample_maps",
]
