"""A multipart/form-data body already in memory, read with python-multipart's parser.

The body is whole by the time a route reads it (the outer middleware bounds it), so its parts are
collected as bytes in one pass: no temporary file per upload and no awaits between chunks.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header


class MultipartError(ValueError):
    """The body cannot be read as multipart/form-data within the limits."""


class TooManyFiles(MultipartError):
    pass


@dataclass
class Part:
    name: str
    filename: str | None  # None: a text field
    data: bytes = b""  # an upload's bytes
    text: str = ""  # a text field's value


@dataclass
class _Reading:
    charset: str
    max_files: int
    max_fields: int
    max_field_bytes: int
    parts: list[Part] = field(default_factory=list)
    header_name: bytes = b""
    header_value: bytes = b""
    disposition: bytes = b""
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    files: int = 0
    fields: int = 0

    def part_begin(self) -> None:
        self.disposition, self.chunks, self.size = b"", [], 0

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def header_value_part(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name, self.header_value = b"", b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise MultipartError('a part\'s Content-Disposition header must give its "name"')
        filename = options.get(b"filename")
        if filename is not None:
            self.files += 1
            if self.files > self.max_files:
                raise TooManyFiles(f"more than {self.max_files} files")
        else:
            self.fields += 1
            if self.fields > self.max_fields:
                raise MultipartError(f"more than {self.max_fields} fields")
        self.parts.append(
            Part(
                name=_text(options[b"name"], self.charset),
                filename=None if filename is None else _text(filename, self.charset),
            )
        )

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self.size += end - start
        if self.parts[-1].filename is None and self.size > self.max_field_bytes:
            raise MultipartError(f"a text field is over {self.max_field_bytes // 1024} KiB")
        self.chunks.append(data[start:end])

    def part_end(self) -> None:
        part = self.parts[-1]
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        if part.filename is None:
            part.text = _text(data, self.charset)
        else:
            part.data = data


def read_parts(
    body: bytes, content_type: str, *, max_files: int, max_fields: int, max_field_bytes: int
) -> list[Part]:
    """The parts of ``body`` in order. Raises ``TooManyFiles`` past ``max_files`` uploads and
    ``MultipartError`` for anything else that is wrong: no boundary, a body cut short (without its
    closing delimiter), a part without a name, more than ``max_fields`` text fields, one over
    ``max_field_bytes``, or a malformed body."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise MultipartError("the multipart content type names no boundary")
    close = b"--" + boundary + b"--"
    if not (body.startswith(close) or b"\r\n" + close in body or b"\n" + close in body):
        # the parser would quietly return the parts seen so far, dropping images
        raise MultipartError("the body has no closing boundary: the upload was cut short")
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        charset = codecs.lookup(charset).name
    except LookupError:
        charset = "latin-1"
    reading = _Reading(charset, max_files, max_fields, max_field_bytes)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": reading.part_begin,
            "on_part_data": reading.part_data,
            "on_part_end": reading.part_end,
            "on_header_field": reading.header_field,
            "on_header_value": reading.header_value_part,
            "on_header_end": reading.header_end,
            "on_headers_finished": reading.headers_finished,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise MultipartError("the body is not valid multipart data") from exc
    return reading.parts


def _text(raw: bytes, charset: str) -> str:
    try:
        return raw.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return raw.decode("latin-1")
