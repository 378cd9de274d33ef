"""The one image reader and decoder, shared by training, evaluation, batch embedding and serving.

* :func:`read_bytes` -- the raw bytes of a local path or of any pyarrow filesystem URI (``s3://``, ``gs://``,
  ``hdfs://``, ``file://``), optionally relative to a root directory or URI.
* :func:`decode_image` -- bytes -> fully loaded RGB ``PIL.Image``. Truncated files, non-image data and decompression
  bombs raise :class:`BadImageError` naming the source, so a pipeline can skip or fail on the record (it never
  silently trains on half an image: PIL's ``LOAD_TRUNCATED_IMAGES`` is left False). EXIF orientation is applied, so
  a phone photo is seen upright everywhere.
* :func:`load_image` -- any of a PIL image, raw bytes or a path/URI, decoded the same way.
"""

from __future__ import annotations

import io
from pathlib import Path, PurePosixPath

from PIL import Image, ImageOps, UnidentifiedImageError

#: default guard against decompression bombs (PIL's own warning threshold, about 89 megapixels)
DEFAULT_MAX_PIXELS: int = 89_478_485


#: file name endings read as images when a folder is listed (batch embedding) or a string is classified (Predictor)
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class BadImageError(ValueError):
    """An image could not be decoded (truncated, not an image, or too large); the message names its source."""


class ImageTooLargeError(BadImageError):
    """An image has more pixels than allowed (``max_pixels``, or PIL's decompression-bomb limit)."""


def _is_uri(text: str) -> bool:
    return "://" in text


def resolve_location(source: str | Path, root: str | Path | None = None) -> str:
    """``source`` joined onto ``root`` when it is relative (``root`` may itself be a URI); absolute paths and URIs
    are returned unchanged."""
    text = str(source)
    if root is None or _is_uri(text) or Path(text).is_absolute():
        return text
    root_text = str(root)
    if _is_uri(root_text):
        return root_text.rstrip("/") + "/" + str(PurePosixPath(text))
    return str(Path(root_text) / text)


def read_bytes(source: str | Path, root: str | Path | None = None) -> bytes:
    """The bytes at ``source``: a local path, or a URI read through ``pyarrow.fs.FileSystem.from_uri``.

    Raises:
        FileNotFoundError: nothing at the (resolved) location; the message names it.
        OSError: the filesystem failed otherwise (permissions, network); the message names the location.
    """
    location = resolve_location(source, root)
    if not _is_uri(location):
        path = Path(location)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {location}")
        return path.read_bytes()
    import pyarrow.fs

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(location)
        info = filesystem.get_file_info(path)
        if info.type == pyarrow.fs.FileType.NotFound:
            raise FileNotFoundError(f"image not found: {location}")
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:  # pyarrow raises OSError subclasses / ArrowInvalid (a ValueError)
        raise OSError(f"cannot read image {location}: {exc}") from exc


def decode_image(data: bytes, source: str = "<bytes>", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` into a fully loaded RGB image (EXIF orientation applied).

    Args:
        data: the encoded image file (JPEG, PNG, WebP, ...).
        source: where the bytes came from, for error messages.
        max_pixels: refuse images with more pixels than this (decompression-bomb guard); None disables it.

    Raises:
        BadImageError: empty, truncated or non-image data; its subclass ImageTooLargeError for more than
            ``max_pixels`` pixels.
    """
    if not data:
        raise BadImageError(f"{source}: empty image data")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(
                    f"{source}: {width}x{height} image has {width * height} pixels, more than max_pixels={max_pixels}"
                )
            image.load()  # decode everything now: truncation surfaces here, not later in a worker
            upright = ImageOps.exif_transpose(image)
            return upright.convert("RGB")
    except BadImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{source}: refused as a decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise BadImageError(f"{source}: not an image file PIL can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt data
        raise BadImageError(f"{source}: corrupt or truncated image ({exc})") from exc


def load_image(
    image: Image.Image | bytes | bytearray | memoryview | str | Path,
    root: str | Path | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """An RGB image from a PIL image, raw encoded bytes, or a path/URI (resolved against ``root``).

    Raises:
        BadImageError: undecodable data.
        FileNotFoundError: a path/URI that does not exist.
        TypeError: any other kind of input.
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), "<bytes>", max_pixels)
    if isinstance(image, (str, Path)):
        return decode_image(read_bytes(image, root), resolve_location(image, root), max_pixels)
    raise TypeError(f"cannot load an image from a {type(image).__name__}; pass a PIL image, bytes, or a path/URI")
