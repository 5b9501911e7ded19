"""Writing the standardized pyramidal JPEG TIFF with libvips, from a libvips image or from
RGB row bands streamed to it as an uncompressed PNG through a pipe (`_PngRowStream`), whose
resolution tags make OpenSlide report the output MPP."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyvips

from cpia_assets.core.wsi.settings import StandardizeError, StandardizeSettings

_BIGTIFF_ABOVE = 3 << 30
_F_SETPIPE_SZ = 1031  # fcntl command (Linux)
_PIPE_BYTES = 1 << 20
_FEED_WAIT_S = 0.2


class _PngRowStream:
    """An uncompressed PNG built on the fly from RGB row bands and written into a pipe that
    libvips reads (`write_pyramid_tiff`).

    libvips-binary has no raw or PPM source loader, and a PNG with stored (level 0) deflate
    blocks costs only a copy and two checksums per byte. The rows are produced in a thread of
    our own (`feed`), not in a read callback: that would run the producer's work (in the fused
    path, computing strips with libvips and cutting tiles) nested inside libvips' worker
    threads, whose per-thread buffers then grew the peak memory strip after strip. An exception
    raised while producing rows (e.g. a corrupt source tile) is kept in `error` and the pipe is
    closed early, which makes libvips fail; the caller re-raises `error`.
    """

    def __init__(self, width: int, height: int, bands: Iterable[np.ndarray]) -> None:
        self.width, self.height = width, height
        self.rows_sent = 0
        self.error: BaseException | None = None
        self._bands = iter(bands)

    def feed(self, descriptor: int, stop: threading.Event) -> None:
        """Write the PNG into the pipe's write end `descriptor` and close it; returns early,
        leaving the PNG unfinished, once `stop` is set (the reader has given up)."""
        try:
            os.set_blocking(descriptor, False)
            for piece in self._png_chunks(self._bands):
                view = memoryview(piece)
                while view:
                    try:
                        view = view[os.write(descriptor, view) :]
                    except BlockingIOError:
                        if stop.is_set():
                            return
                        select.select([], [descriptor], [], _FEED_WAIT_S)
        except BrokenPipeError:
            return  # libvips stopped reading: its own error is the one to report
        except Exception as exc:  # re-raised by the caller, see the class docstring
            self.error = exc
        finally:
            os.close(descriptor)

    def _png_chunks(self, bands: Iterator[np.ndarray]) -> Iterator[bytes]:
        """The PNG's bytes in pieces; pixel data, most of what passes here, is copied once (by
        zlib, which reads each row in place)."""
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        yield b"\x89PNG\r\n\x1a\n"
        yield from _png_chunk(b"IHDR", header)
        deflate = zlib.compressobj(0)
        filter_none = b"\x00"  # each row's filter type byte
        for band in bands:
            if band.shape[1:] != (self.width, 3):
                raise StandardizeError(f"band of shape {band.shape} for width {self.width}")
            for row in np.ascontiguousarray(band):
                for data in (deflate.compress(filter_none), deflate.compress(row)):
                    if data:
                        yield from _png_chunk(b"IDAT", data)
            self.rows_sent += len(band)
            band = row = None  # not held while the next band is computed (`_vips_strips`)
        yield from _png_chunk(b"IDAT", deflate.flush())
        yield from _png_chunk(b"IEND", b"")


def _png_chunk(kind: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """A PNG chunk in three pieces (length and type, data, CRC), so `data` is not copied."""
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind, data, struct.pack(">I", crc)


def save_pyramid(
    image: pyvips.Image, dest: Path, *, mpp: tuple[float, float], settings: StandardizeSettings
) -> None:
    """Write `image` as a tiled JPEG TIFF pyramid whose resolution tags give `mpp`."""
    image.tiffsave(
        str(dest),
        tile=True,
        tile_width=settings.tiff_tile_px,
        tile_height=settings.tiff_tile_px,
        pyramid=True,
        compression="jpeg",
        Q=settings.jpeg_quality,
        xres=1000.0 / mpp[0],  # pixels per millimetre
        yres=1000.0 / mpp[1],
        resunit="cm",
        bigtiff=image.width * image.height * 3 > _BIGTIFF_ABOVE,
    )


def write_pyramid_tiff(
    dest: Path,
    bands: Iterable[np.ndarray],
    *,
    size: tuple[int, int],
    mpp: tuple[float, float],
    settings: StandardizeSettings,
    transform: Callable[[pyvips.Image], pyvips.Image] | None = None,
) -> None:
    """Stream RGB row bands of a `size` image, passed through the lazy libvips `transform`
    when given, into a pyramid (`save_pyramid`)."""
    width, height = size
    stream = _PngRowStream(width, height, bands)
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):  # a larger pipe buffer where the system allows it
        fcntl.fcntl(write_end, _F_SETPIPE_SZ, _PIPE_BYTES)
    stop = threading.Event()
    feeder = threading.Thread(target=stream.feed, args=(write_end, stop), name="png-rows")
    feeder.start()
    try:
        source = pyvips.Source.new_from_descriptor(read_end)  # libvips reads a copy of it
        image = pyvips.Image.new_from_source(source, "", access="sequential")
        save_pyramid(transform(image) if transform else image, dest, mpp=mpp, settings=settings)
    except pyvips.Error as exc:
        if stream.error is not None:
            raise stream.error from exc
        raise
    finally:
        os.close(read_end)
        stop.set()
        feeder.join()
        trim_operation_cache()  # the cached load holds libvips' copy of the read end
    if stream.error is not None:
        raise stream.error
    if stream.rows_sent != height:
        raise StandardizeError(f"{dest.name}: {stream.rows_sent} rows written, {height} expected")


def trim_operation_cache() -> None:
    """Empty libvips' operation cache, whose entries hold their inputs alive: the memory of a
    strip that was cropped, the pipe a stream was loaded from."""
    limit = pyvips.cache_get_max()
    pyvips.cache_set_max(0)
    pyvips.cache_set_max(limit)
