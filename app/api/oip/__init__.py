"""The Open Inference Protocol v2 (KServe / Triton REST) on the same models and pipeline as /v1."""

from app.api.oip.routes import router

__all__ = ["router"]
