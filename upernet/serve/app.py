"""The HTTP API and web page of `upernet serve`: `create_app(segmenter, limits)`.

    POST /predict            an image (raw body with an image/* type, or the file of a multipart form)
        ?format=json         Hugging Face inference format: [{"label", "score", "mask": base64 PNG}]
        ?format=labels       palette PNG of class indices at the image's size
        ?format=overlay      the image blended with the colours (&alpha=0.5, &legend=true)
        ?format=map          {"width", "height", "labels": base64 uint8/uint16 row-major, "classes": [...]}
    GET  /health             {"status": "ok", "queued": images waiting, "forward_passes": {images per pass: count}}
    GET  /info               model, classes, palette, test-time protocol, limits
    GET  /                   the web page (static/, no external requests)

Every bad upload is a 4xx with a one-line `detail`, and the server keeps serving. The model runs
in one thread (`BatchWorker`, which also does the torch pre-processing); decoding and encoding run
in the server's thread pool.
"""
from __future__ import annotations

import asyncio
import base64
import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps, UnidentifiedImageError

from ..data.classes import default_palette
from ..data.datasets import decode_tiff, is_tiff_data
from ..data.transforms import image_bands, select_channels
from ..errors import UserError
from ..inference.predict import SAMPLE_IMAGE
from ..inference.segmenter import Segmentation, Segmenter, label_image
from .batching import BatchWorker, QueueFull

STATIC = Path(__file__).resolve().parent / "static"
FORMATS = ("json", "labels", "overlay", "map")
RAW_TYPES = ("application/octet-stream",)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server.

    Args:
        max_upload_bytes: largest request body (the image file, or the whole multipart form).
        max_pixels: largest image, width x height, checked from the header before decoding.
        max_queue: images waiting for the model at most; beyond, 503.
        max_batch: images per forward pass at most.
    """

    max_upload_bytes: int = 20 * 2 ** 20
    max_pixels: int = 40_000_000
    max_queue: int = 16
    max_batch: int = 4


class BadUpload(Exception):
    """An upload the client must fix: the HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---- reading uploads ----------------------------------------------------------------------------
def check_content_type(content_type: str | None, where: str = "the request body") -> None:
    """image/* or application/octet-stream; anything else is 415."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if not (kind.startswith("image/") or kind in RAW_TYPES):
        raise BadUpload(415, f"{where} has content type {kind or 'none'!r}: send an image (image/png, image/jpeg, "
                             f"...) as the body, or as the file of a multipart/form-data form")


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """413 for an image over the pixel limit, 400 for one without pixels (from its header, before decoding)."""
    if width * height > max_pixels:
        raise BadUpload(413, f"the image is {width}x{height} = {width * height} pixels, over the limit of "
                             f"{max_pixels} (upernet serve --max-pixels)")
    if width < 1 or height < 1:
        raise BadUpload(400, f"the image is {width}x{height}: it has no pixels")


def open_image(data: bytes, max_pixels: int, channels: int = 3) -> np.ndarray:
    """The uint8 (H, W, `channels`) bands of uploaded bytes, read as `upernet predict` reads a file
    (`data.datasets.read_image`): TIFFs by tifffile (any number of bands, 16-bit scaled), other formats
    by PIL with their EXIF orientation applied; grey repeated to RGB and alpha dropped for 3 channels.
    The size is checked before decoding; an image whose bands the model cannot take is a 400."""
    if not data:
        raise BadUpload(400, "the upload is empty: send an image file")
    if is_tiff_data(data):
        try:
            height, width = decode_tiff(data, header_only=True)
            check_pixels(width, height, max_pixels)
            bands = decode_tiff(data)
        except UserError as e:
            raise BadUpload(400, str(e)) from None
        try:
            return select_channels(image_bands(bands), channels)
        except UserError as e:
            raise BadUpload(400, f"the upload: {e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadUpload(413, f"image refused as a decompression bomb ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise BadUpload(400, "the upload is not an image this server can read (PNG, JPEG, WebP, BMP, TIFF, GIF)") from None
    check_pixels(*image.size, max_pixels)
    try:
        image.load()
        return select_channels(image_bands(ImageOps.exif_transpose(image)), channels)
    except UserError as e:
        raise BadUpload(400, f"the upload: {e}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadUpload(400, f"the image is truncated or corrupt ({e})") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadUpload(413, f"the upload is {int(declared)} bytes, over the limit of {limit} "
                             f"(upernet serve --max-upload-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadUpload(413, f"the upload is over the limit of {limit} bytes (upernet serve --max-upload-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def upload_bytes(request: Request, limit: int) -> bytes:
    """The image file of a request: its raw body, or the (single) file of a multipart form."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        check_content_type(kind)
        return await read_body(request, limit)
    body = await read_body(request, limit)

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except Exception as e:  # noqa: BLE001 - a malformed form is the client's to fix, whatever the parser says
        raise BadUpload(400, f"cannot read the multipart form ({e})") from None
    files = [value for value in form.values() if hasattr(value, "read")]
    if len(files) != 1:
        raise BadUpload(400, f"the multipart form has {len(files)} files: send exactly one image (field 'image')")
    check_content_type(files[0].content_type or "application/octet-stream", f"the form file {files[0].filename!r}")
    return await files[0].read()


# ---- answers ------------------------------------------------------------------------------------
def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def label_png(result: Segmentation) -> Image.Image:
    """Class indices as a palette PNG (16-bit grey beyond 256 classes), as `upernet predict` writes them."""
    return label_image(result.labels, result.palette)


def pipeline_json(result: Segmentation) -> list[dict[str, Any]]:
    """`Segmentation.to_pipeline` with each mask as a base64 PNG: the Hugging Face inference API's format."""
    return [{**item, "mask": base64.b64encode(png_bytes(item["mask"])).decode("ascii")}
            for item in result.to_pipeline()]


def label_map_json(result: Segmentation) -> dict[str, Any]:
    """The label map compactly (for the web page): raw indices, and per class present its share and colour."""
    dtype = np.uint8 if len(result.class_names) <= 256 else np.uint16
    present, counts = np.unique(result.labels, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    height, width = result.labels.shape
    return {"width": width, "height": height, "dtype": np.dtype(dtype).name,
            "labels": base64.b64encode(result.labels.astype(dtype).tobytes()).decode("ascii"),
            "classes": [{"index": int(present[i]), "label": result.class_names[present[i]],
                         "share": float(counts[i]) / result.labels.size, "color": list(result.palette[present[i]])}
                        for i in order]}


def answer(result: Segmentation, format: str, alpha: float, legend: bool) -> Response:
    if format == "json":
        return JSONResponse(pipeline_json(result))
    if format == "map":
        return JSONResponse(label_map_json(result))
    picture = label_png(result) if format == "labels" else result.overlay(alpha=alpha, legend=legend)
    return Response(png_bytes(picture), media_type="image/png")


# ---- the app ------------------------------------------------------------------------------------
def size_text(size: None | int | tuple[int, int]) -> str:
    """A resize rule as `--size` spells it: "none", "512" (short side) or "2048x512" (keep ratio)."""
    if size is None:
        return "none"
    return str(size) if isinstance(size, int) else "x".join(str(v) for v in size)


def describe(segmenter: Segmenter, name: str | None, limits: Limits) -> dict[str, Any]:
    """What /info answers: the model, its classes and colours, and how it runs."""
    meta = segmenter.meta
    return {"model": name or type(segmenter.model).__name__,
            "classes": list(segmenter.class_names),
            "palette": [list(c) for c in meta.get("palette") or default_palette(len(segmenter.class_names))],
            "protocol": {"size": size_text(segmenter.size),
                         "mode": segmenter.mode, "crop_size": list(segmenter.crop_size),
                         "stride": list(segmenter.stride), "scales": list(segmenter.scales), "flip": segmenter.flip,
                         "mean": list(meta["mean"]), "std": list(meta["std"]), "device": str(segmenter.device),
                         "in_channels": len(segmenter.preprocessor.mean),
                         "binary_threshold": meta.get("binary_threshold")},
            "limits": asdict(limits),
            "formats": list(FORMATS)}


def create_app(segmenter: Segmenter, limits: Limits = Limits(), name: str | None = None) -> FastAPI:
    """A FastAPI app serving `segmenter` (loaded once, prepared for inference) within `limits`.

    Args:
        segmenter: the model and its test-time protocol (multi-task models: the object task).
        limits: upload size, pixel count, queue length and batch size.
        name: the model's name for /info (default: its class name).
    """
    worker = BatchWorker(segmenter, limits.max_queue, limits.max_batch)
    info = describe(segmenter, name, limits)
    channels = len(segmenter.preprocessor.mean)  # the model's in_channels

    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="upernet serve", description="UPerNet semantic segmentation", lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # FastAPI's docs pages load their scripts from a CDN
    app.state.worker = worker

    @app.exception_handler(BadUpload)
    async def bad_upload(request: Request, error: BadUpload) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Alive; images waiting, and forward passes so far by images per pass."""
        return {"status": "ok", "queued": worker.jobs.qsize(),
                "forward_passes": {str(size): count for size, count in sorted(worker.batch_sizes.items())}}

    @app.get("/info")
    async def describe_model() -> dict[str, Any]:
        return info

    @app.post("/predict")
    async def predict(request: Request, format: str = "json", alpha: float = 0.5, legend: bool = True) -> Response:
        if format not in FORMATS:
            raise HTTPException(400, f"format {format!r}: use one of {', '.join(FORMATS)}")
        if not 0.0 <= alpha <= 1.0:
            raise HTTPException(400, f"alpha {alpha}: use a value from 0 to 1")
        data = await upload_bytes(request, limits.max_upload_bytes)
        image = await run_in_threadpool(open_image, data, limits.max_pixels, channels)
        try:
            future = worker.submit(image)
        except QueueFull as e:
            raise HTTPException(503, f"the server is busy ({e}); retry shortly", headers={"Retry-After": "1"}) from None
        try:
            result = await asyncio.wrap_future(future)
        except UserError as e:
            raise HTTPException(400, str(e)) from None
        if not isinstance(result, Segmentation):  # a multi-task model: its object task
            result = result.tasks["object"]
        return await run_in_threadpool(answer, result, format, alpha, legend)

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/sample.png")
    async def sample() -> FileResponse:
        return FileResponse(SAMPLE_IMAGE, media_type="image/png")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
