"""The OpenAPI document, completed where FastAPI cannot see the server: request bodies that the routes read
themselves (`read_body`: JSON, multipart for videos, multipart only for edits) and the error body need their schemas among the
components, validation errors are answered 400 (`validation_error_handler`), never FastAPI's 422, and the request
schemas carry this server's limits (steps, frames, n, prompt length), so a client (or a fuzzer) reads them there."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from server.api.schemas import ErrorResponse, ImageEditRequest, ImageGenerationRequest, VideoCreateRequest


def openapi_document(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        models = [(ImageGenerationRequest, "validation"), (ImageEditRequest, "validation"),
                  (VideoCreateRequest, "validation"), (ErrorResponse, "serialization")]
        _, bodies = models_json_schema(models, ref_template="#/components/schemas/{model}")
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(bodies["$defs"])
        settings = app.state.accel.settings
        limits = {"num_inference_steps": ("maximum", settings.max_steps), "num_frames": ("maximum", settings.max_frames),
                  "n": ("maximum", settings.max_n), "prompt": ("maxLength", settings.max_prompt_chars),
                  "negative_prompt": ("maxLength", settings.max_prompt_chars),
                  "image": ("maxItems", settings.max_input_images)}
        for request in ("ImageGenerationRequest", "ImageEditRequest", "VideoCreateRequest"):
            for name, (key, limit) in limits.items():
                _cap(schemas[request]["properties"], name, key, limit)
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for operations in doc["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        app.openapi_schema = doc
    return app.openapi_schema


def _cap(properties: dict, name: str, key: str, limit: int) -> None:
    """Lower `key` (maximum, maxLength) of a property to the server's limit, in each non-null alternative."""
    if name not in properties:
        return
    for schema in properties[name].get("anyOf", [properties[name]]):
        if schema.get("type") != "null":
            schema[key] = min(schema.get(key, limit), limit)
