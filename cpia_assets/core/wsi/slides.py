"""Finding slide files, opening them, and resolving their resolution (microns per pixel).

Reading: OpenSlide opens every slide format it supports (SVS, NDPI, MRXS, SCN, generic tiled
TIFF, DICOM WSI, ...) and provides the metadata. When a level is stored as a plain TIFF page that
libvips can decode (SVS and generic TIFF with JPEG/deflate/LZW tiles; not JPEG 2000), its pixels
are streamed through pyvips instead, which decodes about three times faster than OpenSlide and
gives identical pixels. Plain images (flat TIFF, PNG, JPEG) that OpenSlide refuses are read
through pyvips only when the catalog entry sets `allow_plain_images`.

MPP is resolved in a fixed order, each candidate checked against a sane range (`MPP_RANGE`):
OpenSlide's `openslide.mpp-x/y`, vendor keys (`VENDOR_MPP_KEYS`), TIFF resolution tags, the
catalog's per-slide override, then (opt-in, an estimate) 10 / objective power.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import openslide
import pyvips

from cpia_assets.core.catalog.model import WsiOptions
from cpia_assets.core.fsutil import walk_visible
from cpia_assets.core.stage import RawSelection
from cpia_assets.core.wsi.dicom import container_identifier

SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}
)
PLAIN_IMAGE_SUFFIXES = frozenset({".tif", ".tiff", ".png", ".jpg", ".jpeg"})
MPP_RANGE = (0.05, 20.0)
"""Plausible microns per pixel; 72-dpi TIFF tags (352.78) and 1-px/mm defaults fall outside."""

VENDOR_MPP_KEYS = (
    ("aperio.MPP", "aperio.MPP"),
    (
        "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X",
        "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_Y",
    ),
)
"""(x key, y key) pairs holding microns per pixel directly, tried in order."""

_MICRONS_PER_RESOLUTION_UNIT = {"centimeter": 10_000.0, "inch": 25_400.0}
_DICOM_SUFFIX = ".dcm"
_MIRAX_SUFFIX = ".mrxs"
_VIPS_READABLE_VENDORS = frozenset({"aperio", "generic-tiff"})
"""Vendors whose levels are ordinary TIFF pages (checked: same pixels as OpenSlide)."""


class SlideError(Exception):
    """A slide that cannot be used; the message names the file and the reason."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{Path(path).name}: {reason}")
        self.path = Path(path)
        self.reason = reason


class SlideOpenError(SlideError):
    """Neither OpenSlide nor (where allowed) pyvips can open the file."""


class SlideReadError(SlideError):
    """The slide opened but its pixels cannot be decoded (e.g. a corrupt tile)."""


class MppError(SlideError):
    """No plausible microns-per-pixel value could be found for the slide."""


@dataclass(frozen=True)
class Mpp:
    """Microns per pixel of level 0 and where the value came from (schema `mpp_origin`)."""

    x: float
    y: float
    origin: str

    @property
    def estimated(self) -> bool:
        return self.origin == "objective-power"


@dataclass(frozen=True)
class SlideInfo:
    """What the rest of the pipeline needs to know about an opened slide."""

    path: Path
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: Mapping[str, str]

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def tile_height(self, level: int) -> int:
        """Rows per stored tile; reading in multiples of it decodes every tile once."""
        return int(self.properties.get(f"openslide.level[{level}].tile-height", 256))


def slide_stem(path: Path) -> str:
    """The slide name used in outputs: the file name up to its first dot, as the published
    scripts do (so `TCGA-...-BSA.<uuid>.svs` gives `TCGA-...-BSA`). A DICOM slide is a folder of
    `.dcm` files named by series UUID (IDC): its name is the slide's ContainerIdentifier (the
    original slide name, `dicom.container_identifier`), else the folder's. The UUID stays in the
    records' `source_file`."""
    path = Path(path)
    if path.suffix.lower() == _DICOM_SUFFIX:
        return container_identifier(path) or path.parent.name.split(".", 1)[0]
    return path.name.split(".", 1)[0]


def select_slides(raw_dir: Path, options: WsiOptions) -> RawSelection:
    """The slide files under `raw_dir` (recursively, sorted), and every other file with the
    reason it is not used.

    Selected by `options.patterns` (globs relative to `raw_dir`) when given, else by extension
    (plus plain-image extensions when `allow_plain_images`). Hidden files and folders (our
    temporary and record files start with '.') are not looked at; links to folders are followed
    (`fsutil.walk_visible`). A DICOM folder yields only its first `.dcm` file (OpenSlide opens
    the whole series from any of them); the files in a MIRAX slide's data folder (`x/` beside
    `x.mrxs`) are its sidecars.
    """
    walk = walk_visible(raw_dir)
    suffixes = SLIDE_SUFFIXES | (PLAIN_IMAGE_SUFFIXES if options.allow_plain_images else set())
    selection = RawSelection(refused=walk.refused)
    others: list[str] = []
    dicom_slides: dict[str, str] = {}  # folder -> its first .dcm file
    mirax_slides: dict[str, str] = {}  # data folder ("x/") -> its slide ("x.mrxs")
    for path, relative in walk.files:
        suffix = path.suffix.lower()
        if options.patterns:
            selected = any(fnmatch.fnmatch(relative, p) for p in options.patterns)
        else:
            selected = suffix in suffixes
        if not selected:
            others.append(relative)
            continue
        if suffix == _DICOM_SUFFIX:
            first = dicom_slides.setdefault(posixpath.dirname(relative), relative)
            if first != relative:
                selection.skipped.append((relative, f"another file of the DICOM slide {first}"))
                continue
        if suffix == _MIRAX_SUFFIX:
            mirax_slides[relative[: -len(suffix)] + "/"] = relative
        selection.used.append(path)
    for relative in others:
        slide = next((s for f, s in mirax_slides.items() if relative.startswith(f)), None)
        selection.skipped.append((relative, _not_a_slide(relative, options, slide)))
    selection.skipped.sort()
    return selection


def _not_a_slide(relative: str, options: WsiOptions, mirax_slide: str | None) -> str:
    """Why a file that `select_slides` did not select is left out."""
    suffix = PurePosixPath(relative).suffix.lower()
    if mirax_slide is not None:
        return f"data file of the MIRAX slide {mirax_slide}"
    if options.patterns:
        return f"matches none of the catalog's slide patterns {list(options.patterns)}"
    if suffix in PLAIN_IMAGE_SUFFIXES:
        return f"plain image ({suffix}): set wsi.allow_plain_images to read it as a slide"
    return f"not a slide file ({suffix or 'no extension'})"


def resolve_mpp(path: Path, properties: Mapping[str, str], options: WsiOptions) -> Mpp:
    """The slide's level-0 MPP from its metadata, the catalog's overrides or objective power.

    Sources are tried in the module docstring's order; a value outside `MPP_RANGE` is skipped
    with its reason noted. When only one axis is given it is used for both. Raises `MppError`
    listing every rejected value when nothing usable is found.
    """
    rejected: list[str] = []
    for origin, x_key, y_key, to_microns in _metadata_candidates(properties):
        mpp = _checked_pair(properties, x_key, y_key, to_microns, origin, rejected)
        if mpp:
            return mpp
    override = _override_for(path, options.mpp_overrides)
    if override is not None:
        if _plausible(override):
            return Mpp(override, override, "override")
        rejected.append(f"override {override:g} {_range_text()}")
    if options.use_objective_power:
        power = _parse_float(properties.get("openslide.objective-power"))
        if power and _plausible(10.0 / power):
            return Mpp(10.0 / power, 10.0 / power, "objective-power")
        rejected.append(f"objective power {power!r} unusable")
    if not rejected:
        raise MppError(
            path,
            "no MPP in the metadata (OpenSlide, vendor keys, TIFF resolution tags), no catalog "
            "override, and objective power not enabled (wsi.use_objective_power)",
        )
    raise MppError(path, "no usable MPP: " + "; ".join(rejected))


def _metadata_candidates(
    properties: Mapping[str, str],
) -> Iterator[tuple[str, str, str, Callable[[float], float]]]:
    yield "openslide", "openslide.mpp-x", "openslide.mpp-y", float
    for x_key, y_key in VENDOR_MPP_KEYS:
        yield f"vendor:{x_key}", x_key, y_key, float
    unit = properties.get("tiff.ResolutionUnit", "").lower()
    if unit in _MICRONS_PER_RESOLUTION_UNIT:
        microns = _MICRONS_PER_RESOLUTION_UNIT[unit]
        yield "tiff-tags", "tiff.XResolution", "tiff.YResolution", lambda res: microns / res


def _checked_pair(
    properties: Mapping[str, str],
    x_key: str,
    y_key: str,
    to_microns: Callable[[float], float],
    origin: str,
    rejected: list[str],
) -> Mpp | None:
    raw_x = _parse_float(properties.get(x_key))
    raw_y = _parse_float(properties.get(y_key))
    given = raw_x or raw_y
    if given is None:
        return None
    x = to_microns(raw_x or given)
    y = to_microns(raw_y or given)
    if _plausible(x) and _plausible(y):
        return Mpp(x, y, origin)
    rejected.append(f"{origin} gives {x:g} x {y:g} um/px {_range_text()}")
    return None


def _override_for(path: Path, overrides: Mapping[str, float]) -> float | None:
    path = Path(path)
    for name in (path.name, path.stem, slide_stem(path)):
        if name in overrides:
            return float(overrides[name])
    return None


def _parse_float(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value and value > 0 else None


def _plausible(mpp: float) -> bool:
    return MPP_RANGE[0] <= mpp <= MPP_RANGE[1]


def _range_text() -> str:
    return f"(outside the plausible {MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} um/px)"


class SlideReader:
    """An opened slide: metadata plus streaming access to the pixels of one level.

    Open with `open_slide`; use as a context manager. Not picklable: workers reopen by path.
    """

    def __init__(
        self, path: Path, *, slide: openslide.OpenSlide | None, plain: pyvips.Image | None
    ):
        self.path = Path(path)
        self._slide = slide
        self._plain = plain
        if slide is not None:
            self.info = SlideInfo(
                path=self.path,
                vendor=slide.properties.get("openslide.vendor") or "unknown",
                level_dimensions=tuple(slide.level_dimensions),
                level_downsamples=tuple(slide.level_downsamples),
                properties=dict(slide.properties),
            )
        else:
            assert plain is not None
            self.info = SlideInfo(
                path=self.path,
                vendor=f"plain:{plain.get('vips-loader')}",
                level_dimensions=((plain.width, plain.height),),
                level_downsamples=(1.0,),
                properties=_plain_image_properties(plain),
            )

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()

    def resolve_mpp(self, options: WsiOptions) -> Mpp:
        return resolve_mpp(self.path, self.info.properties, options)

    def level_image(self, level: int) -> pyvips.Image | None:
        """The level as a lazy RGB libvips image when libvips can decode it (plain images and
        the TIFF pages of `_VIPS_READABLE_VENDORS`), else None: read it with `iter_rows`.
        Decoding errors surface as `pyvips.Error` when its pixels are computed."""
        if self._slide is None:
            image = self._plain
        elif self.info.vendor in _VIPS_READABLE_VENDORS:
            image = _vips_page(self.path, self.info.level_dimensions[level])
        else:
            image = None
        return None if image is None else _as_rgb(image)

    def iter_rows(self, level: int, chunk_rows: int) -> Iterator[np.ndarray]:
        """The level's pixels top to bottom as RGB uint8 arrays of up to `chunk_rows` rows.

        Raises `SlideReadError` naming the file when a tile cannot be decoded.
        """
        width, height = self.info.level_dimensions[level]
        image = self.level_image(level)
        try:
            if image is not None:
                yield from _vips_rows(image, chunk_rows)
            else:
                yield from self._openslide_rows(level, width, height, chunk_rows)
        except (openslide.OpenSlideError, pyvips.Error) as exc:
            raise SlideReadError(self.path, f"cannot read level {level}: {exc}") from exc

    def _openslide_rows(
        self, level: int, width: int, height: int, chunk_rows: int
    ) -> Iterator[np.ndarray]:
        assert self._slide is not None
        downsample = self.info.level_downsamples[level]
        for top in range(0, height, chunk_rows):
            rows = min(chunk_rows, height - top)
            rgba = self._slide.read_region((0, round(top * downsample)), level, (width, rows))
            yield flatten_rgba(np.asarray(rgba))


def open_slide(path: Path, options: WsiOptions) -> SlideReader:
    """Open a slide with OpenSlide, or a plain image with pyvips when the catalog allows it."""
    path = Path(path)
    try:
        return SlideReader(path, slide=openslide.OpenSlide(path), plain=None)
    except openslide.OpenSlideError as exc:
        openslide_reason = f"OpenSlide cannot open it ({exc or type(exc).__name__})"
    except OSError as exc:
        raise SlideOpenError(path, f"cannot open: {exc}") from exc
    if not (options.allow_plain_images and path.suffix.lower() in PLAIN_IMAGE_SUFFIXES):
        raise SlideOpenError(path, openslide_reason)
    try:
        plain = pyvips.Image.new_from_file(str(path))
    except pyvips.Error as exc:
        raise SlideOpenError(path, f"{openslide_reason}; pyvips cannot open it ({exc})") from exc
    return SlideReader(path, slide=None, plain=plain)


def flatten_rgba(rgba: np.ndarray) -> np.ndarray:
    """RGB over a white background: OpenSlide marks unscanned areas transparent."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    weight = alpha.astype(np.uint16)
    blended = (rgb * weight + 255 * (255 - weight) + 127) // 255
    return blended.astype(np.uint8)


def _vips_page(path: Path, size: tuple[int, int]) -> pyvips.Image | None:
    """The TIFF page holding this level when libvips can decode it, else None (use OpenSlide)."""
    try:
        pages = pyvips.Image.tiffload(str(path)).get("n-pages")
        for page in range(pages):
            image = pyvips.Image.tiffload(str(path), page=page)
            if (image.width, image.height) == size:
                # Decode one tile now: JPEG 2000 pages open fine but cannot be decoded.
                image.crop(0, 0, 1, 1).avg()
                return image
    except pyvips.Error:
        return None
    return None


def _as_rgb(image: pyvips.Image) -> pyvips.Image:
    if image.hasalpha():
        image = image.flatten(background=[255, 255, 255])
    if image.interpretation not in ("srgb", "rgb"):
        image = image.colourspace("srgb")
    if image.bands == 1:
        image = image.bandjoin([image, image])
    return image.cast("uchar")


def _vips_rows(image: pyvips.Image, chunk_rows: int) -> Iterator[np.ndarray]:
    for top in range(0, image.height, chunk_rows):
        rows = min(chunk_rows, image.height - top)
        yield image.crop(0, top, image.width, rows).numpy()


def _plain_image_properties(image: pyvips.Image) -> dict[str, str]:
    """Resolution of a plain image in OpenSlide's TIFF property names (vips keeps px per mm)."""
    if "resolution-unit" not in image.get_fields():
        return {}
    return {
        "tiff.ResolutionUnit": "centimeter",
        "tiff.XResolution": str(image.xres * 10),
        "tiff.YResolution": str(image.yres * 10),
    }
