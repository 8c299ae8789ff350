"""ZIP uploads of class folders of PNG/JPEG images, read in memory with zip-bomb and pixel caps."""

from __future__ import annotations

import io
import posixpath
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kd_core.data import dataset as limits
from kd_core.data.dataset import RawData
from kd_core.data.options import image_size_option
from kd_core.errors import DatasetError

MAX_ZIP_ENTRIES = 100_000
MAX_ZIP_UNCOMPRESSED = 2 * 1024**3
MAX_IMAGE_FILE_BYTES = 64 * 1024**2
# Per image, checked from the header before any pixel is decoded.
MAX_IMAGE_PIXELS = 8192 * 8192
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MAX_REPORTED_SKIPS = 50
# Files every OS or archiver leaves behind; skipped without a word.
_JUNK = re.compile(r"(^|/)(__MACOSX|\.[^/]*)(/|$)|(^|/)(Thumbs\.db|desktop\.ini)$", re.IGNORECASE)
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def load_zip(path: Path, options: dict[str, Any]) -> RawData:
    """class/*.png (optionally under train/, val/, test/ or one wrapping folder), resized NCHW in [0, 1]."""
    size, layout, skipped, class_names = _plan(path, options)
    class_index = {name: i for i, name in enumerate(class_names)}
    decoded: dict[str, tuple[list[np.ndarray], list[int], list[bool]]] = {}
    with zipfile.ZipFile(path) as zf:
        for split, classes in layout.items():
            pixels: list[np.ndarray] = []
            labels: list[int] = []
            grays: list[bool] = []
            for hwc, is_gray, cls in _decode_split(zf, classes, size, skipped):
                pixels.append(hwc)
                grays.append(is_gray)
                labels.append(class_index[cls])
            decoded[split] = (pixels, labels, grays)
    if not decoded["train"][0]:
        raise DatasetError(_no_images_message(skipped))
    gray = all(g for _, _, grays in decoded.values() for g in grays)
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, (pixels, labels, _) in decoded.items():
        x = np.stack(pixels) if pixels else np.zeros((0, size[0], size[1], 3), dtype=np.uint8)
        x = x[..., :1] if gray else x
        # uint8 HWC -> float32 CHW in [0, 1]
        arrays[split] = (x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0, np.array(labels, dtype=np.int64))
    info: dict[str, Any] = {"color": "grayscale" if gray else "rgb", "image_size": list(size)}
    if skipped:
        info["skipped"] = skipped[:MAX_REPORTED_SKIPS]
        info["skipped_count"] = len(skipped)
    val, test = arrays.get("val"), arrays.get("test")
    return RawData(
        name=path.stem,
        format="zip",
        x=arrays["train"][0],
        y=arrays["train"][1],
        x_val=val[0] if val else None,
        y_val=val[1] if val else None,
        x_test=test[0] if test else None,
        y_test=test[1] if test else None,
        class_names=class_names,
        is_image=True,
        fingerprint_options={"image_size": list(size), "color": info["color"]},
        info=info,
    )


def _plan(
    path: Path, options: dict[str, Any]
) -> tuple[tuple[int, int], dict[str, dict[str, list[str]]], list[dict[str, str]], list[str]]:
    """Image size, split/class layout, skips so far and class names, refusing what would not fit in memory."""
    size = image_size_option(options)
    files, skipped = _list_members(path)
    layout = _layout(files, skipped)
    if not layout:
        raise DatasetError(_no_images_message(skipped))
    if "train" not in layout:
        raise DatasetError("the ZIP file has val/ or test/ folders but no train/ folder")
    # Checked here, before any image is decoded: a folder name is a class name, with the same bounds.
    class_names = limits.check_class_names(sorted({cls for split in layout.values() for cls in split}))
    n_images = sum(len(names) for split in layout.values() for names in split.values())
    if n_images * 3 * size[0] * size[1] * 4 > limits.MAX_ARRAY_BYTES:
        raise DatasetError(
            f"{n_images} images at {size[0]}x{size[1]} would take more than "
            f"{limits.MAX_ARRAY_BYTES // 1024**2} MiB; choose a smaller image_size"
        )
    return size, layout, skipped, class_names


def _decode_split(
    zf: zipfile.ZipFile, classes: dict[str, list[str]], size: tuple[int, int], skipped: list[dict[str, str]]
) -> Iterator[tuple[np.ndarray, bool, str]]:
    """(uint8 HWC pixels, grayscale?, class) of one split's images, class by class and name by name.

    An image that cannot be used is recorded in `skipped` instead.
    """
    for cls in sorted(classes):
        for name in sorted(classes[cls]):
            result = _decode(zf, name, size)
            if isinstance(result, str):
                _skip(skipped, name, result)
                continue
            yield result[0], result[1], cls


def _skip(skipped: list[dict[str, str]], name: str, reason: str) -> None:
    skipped.append({"name": name[:200], "reason": reason})


def _no_images_message(skipped: list[dict[str, str]]) -> str:
    msg = "the ZIP file holds no usable images; expected class folders of PNG/JPEG files (class/image.png)"
    if skipped:
        examples = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped[:3])
        msg += f". Skipped {len(skipped)} file(s), e.g. {examples}"
    return msg


def _list_members(path: Path) -> tuple[list[zipfile.ZipInfo], list[dict[str, str]]]:
    """The archive's files after the bomb and path checks; refuses the whole archive when hostile."""
    if not zipfile.is_zipfile(path):
        raise DatasetError("the file is not a ZIP archive")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DatasetError(f"cannot read the ZIP file: {exc}") from exc
    if len(infos) > MAX_ZIP_ENTRIES:
        raise DatasetError(f"the ZIP file has {len(infos)} entries; at most {MAX_ZIP_ENTRIES} are allowed")
    total = sum(i.file_size for i in infos)
    if total > MAX_ZIP_UNCOMPRESSED:
        raise DatasetError(
            f"the ZIP file would unpack to {total // 1024**2} MiB; at most {MAX_ZIP_UNCOMPRESSED // 1024**2} MiB are allowed"
        )
    files: list[zipfile.ZipInfo] = []
    skipped: list[dict[str, str]] = []
    for info in infos:
        name = info.filename
        # Nothing is extracted to disk, but a name that climbs out of the archive marks a hostile file.
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in re.split(r"[/\\]", name):
            raise DatasetError(f"the ZIP file holds an unsafe path {name[:100]!r}; refused")
        if info.is_dir() or _JUNK.search(name):
            continue
        if info.flag_bits & 0x1:
            raise DatasetError("the ZIP file is encrypted; upload an archive without a password")
        files.append(info)
    return files, skipped


def _layout(files: list[zipfile.ZipInfo], skipped: list[dict[str, str]]) -> dict[str, dict[str, list[str]]]:
    """{split: {class: [member names]}} from the folder structure."""
    # Some Windows archivers write backslashes as separators.
    parts = {f.filename: posixpath.normpath(f.filename.replace("\\", "/")).split("/") for f in files}
    # One folder wrapping everything (what zipping a folder produces) is not a class.
    tops = {p[0] for p in parts.values()}
    if (
        len(tops) == 1
        and next(iter(tops)).lower() not in SPLIT_FOLDERS
        and all(len(p) >= 3 for p in parts.values())
    ):
        parts = {n: p[1:] for n, p in parts.items()}
    split_layout = any(len(p) >= 3 and p[0].lower() in SPLIT_FOLDERS for p in parts.values())
    layout: dict[str, dict[str, list[str]]] = {}
    by_name = {f.filename: f for f in files}
    for name, p in parts.items():
        if split_layout:
            if p[0].lower() not in SPLIT_FOLDERS:
                _skip(skipped, name, "outside the train/, val/ and test/ folders")
                continue
            split, p = SPLIT_FOLDERS[p[0].lower()], p[1:]
        else:
            split = "train"
        if len(p) < 2:
            _skip(skipped, name, "not inside a class folder")
            continue
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            _skip(skipped, name, "not a .png, .jpg or .jpeg file")
            continue
        if by_name[name].file_size > MAX_IMAGE_FILE_BYTES:
            _skip(skipped, name, f"larger than {MAX_IMAGE_FILE_BYTES // 1024**2} MiB")
            continue
        layout.setdefault(split, {}).setdefault(p[0], []).append(name)
    return layout


def _decode(zf: zipfile.ZipFile, name: str, size: tuple[int, int]) -> tuple[np.ndarray, bool] | str:
    """(uint8 HxWx3 pixels, is grayscale) or the reason the file was skipped."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        data = zf.read(name)
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice it; we want an error at ours.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]) as img:
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    return f"{w}x{h} pixels is more than the {MAX_IMAGE_PIXELS:,} allowed"
                img = ImageOps.exif_transpose(img)
                gray = img.mode in _GRAY_MODES
                rgb = img.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "not a readable PNG or JPEG image"
    except (OSError, ValueError, SyntaxError, zipfile.BadZipFile, EOFError) as exc:
        return f"could not be decoded ({str(exc)[:80]})"
    pixels = np.asarray(rgb, dtype=np.uint8)
    if not gray:
        # A colour-mode file whose channels are all equal is a grayscale picture too.
        gray = bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())
    return pixels, gray
