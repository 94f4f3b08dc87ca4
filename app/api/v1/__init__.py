"""Version 1 of the HTTP API (the service's own): routes, schemas, body parsing and the codec."""

from app.api.v1.routes import router

__all__ = ["router"]
