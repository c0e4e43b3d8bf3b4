"""Uploaded files: multipart/form-data parsed by python-multipart, in memory, and input images decoded by Pillow.

Nothing here touches the disk: the body is already in memory (the guard bounds it by `max_body_bytes`), and the
parser keeps every file part in memory whatever its size. An image must be PNG, JPEG or WebP by its content (the
file name and the part's content type are ignored), at most `max_input_pixels` pixels by its header (checked before
any pixel is decoded, so a decompression bomb costs nothing), and decode completely (`verify()`, then `load()`: a
truncated or corrupt file is refused). A bad file is a 400 naming its field: `image`, `image[1]`, `mask`,
`input_reference`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import create_form_parser

from server.api.errors import bad_request

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # what Pillow may recognise an upload as
REPEATABLE = {"image": "image", "image[]": "image"}  # file fields that may repeat, and the field they fill


@dataclass(frozen=True, repr=False)
class Upload:
    """A file part of a multipart body, as received (its file name is never used to read or write anything)."""

    filename: str
    content: bytes

    def __repr__(self) -> str:
        return f"Upload({self.filename!r}, {len(self.content)} bytes)"


def parse_form(content_type: str, raw: bytes) -> dict[str, Any]:
    """A multipart/form-data body as {name: text or Upload}; `image` and `image[]` parts (files or not) are
    collected in order into a list under `image`. Text is strict UTF-8; any other repeated field, a part without
    a name, or a body without its closing boundary is a 400."""
    parts: list[tuple[bytes | None, Any]] = []
    ended = []
    try:
        parser = create_form_parser(
            {"Content-Type": content_type.encode("latin-1", "replace")},
            on_field=lambda field: parts.append((field.field_name, field.value or b"")),
            on_file=lambda file: parts.append((file.field_name, file)),
            config={"MAX_MEMORY_FILE_SIZE": float("inf")},  # never spool to a temporary file
        )
        parser.on_end = lambda: ended.append(True)
        parser.write(raw)
        parser.finalize()
    except (FormParserError, ValueError) as exc:
        raise bad_request(f"malformed multipart body: {exc}") from None
    if not ended:
        raise bad_request("malformed multipart body: no closing boundary")
    fields: dict[str, Any] = {}
    for raw_name, value in parts:
        name = _text(raw_name or b"", "a field name")
        if not name:
            raise bad_request("malformed multipart body: a part without a name")
        if isinstance(value, bytes):
            value = _text(value, name)
        else:
            value = Upload(_text(value.file_name or b"", name), value.file_object.getvalue())
        if name in REPEATABLE:
            fields.setdefault(REPEATABLE[name], []).append(value)
        elif name in fields:
            raise bad_request(f"{name}: given more than once", name)
        else:
            fields[name] = value
    return fields


def _text(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request(f"{name}: not UTF-8 text", None if name == "a field name" else name) from None


def decode_image(upload: Upload, param: str, max_pixels: int, mode: str = "RGB") -> Image.Image:
    """The upload as a decoded PIL image in `mode`, or a 400 naming `param`."""
    try:
        with Image.open(io.BytesIO(upload.content), formats=IMAGE_FORMATS) as probe:  # reads the header only
            width, height = probe.size
            if width * height > max_pixels:
                raise bad_request(f"{param}: {width}x{height} is more than this server's limit of {max_pixels} "
                                  "pixels per input image", param)
            probe.verify()  # the file's structure (PNG: every chunk and its checksum)
        with Image.open(io.BytesIO(upload.content), formats=IMAGE_FORMATS) as image:
            image.load()  # every pixel: a truncated or corrupt image fails here
            return image.convert(mode)
    except UnidentifiedImageError:
        raise bad_request(f"{param}: not a PNG, JPEG or WebP image", param) from None
    except Image.DecompressionBombError as exc:  # Pillow's own refusal, at twice its MAX_IMAGE_PIXELS
        raise bad_request(f"{param}: more than this server's limit of {max_pixels} pixels per input image ({exc})",
                          param) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise bad_request(f"{param}: not a valid image ({exc})", param) from None
