"""Pure PyTorch engine: model loading, preprocessing and ViT-ReciproCAM. Imports nothing from the server."""

from app.engine.anatomy import UnsupportedModelError
from app.engine.maps import normalize_maps, upsample_maps
from app.engine.masks import mask_matrix, mask_supports
from app.engine.models import LoadedModel, ModelLoadError, load_model
from app.engine.options import CamOptions
from app.engine.preprocess import DataConfig, Geometry, Preprocessor, project_to_original
from app.engine.reciprocam import ReciproCAM
from app.engine.results import ImageExplanation

__all__ = [
    "CamOptions",
    "DataConfig",
    "Geometry",
    "ImageExplanation",
    "LoadedModel",
    "ModelLoadError",
    "Preprocessor",
    "ReciproCAM",
    "UnsupportedModelError",
    "load_model",
    "mask_matrix",
    "mask_supports",
    "normalize_maps",
    "project_to_original",
    "upsample_maps",
]
