"""The OpenAPI document, completed where FastAPI cannot see the server: request bodies that the routes read
themselves (`read_body`: JSON, and multipart for videos) need their schemas among the components, and validation
errors are answered 400 (`validation_error_handler`), never FastAPI's 422."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from server.api.schemas import ImageGenerationRequest, VideoCreateRequest


def openapi_document(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, bodies = models_json_schema([(ImageGenerationRequest, "validation"), (VideoCreateRequest, "validation")],
                                       ref_template="#/components/schemas/{model}")
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(bodies["$defs"])
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for operations in doc["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        app.openapi_schema = doc
    return app.openapi_schema
