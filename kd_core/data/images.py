"""Class folders of PNG/JPEG images (a ZIP or an imported folder): layout, zip-bomb and pixel caps, decoding."""

from __future__ import annotations

import io
import posixpath
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np

from kd_core.data import dataset as limits
from kd_core.errors import DatasetError

MAX_ZIP_ENTRIES = 100_000
# The archive's declared total: images are streamed one at a time into the store, so this bounds disk
# and time, not memory; a bomb entry is stopped by MAX_IMAGE_FILE_BYTES and MAX_IMAGE_PIXELS.
MAX_ZIP_UNCOMPRESSED = 256 * 1024**3
MAX_IMAGE_FILE_BYTES = 64 * 1024**2
# Per image, checked from the header before any pixel is decoded.
MAX_IMAGE_PIXELS = 8192 * 8192
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MAX_REPORTED_SKIPS = 50
# Files every OS or archiver leaves behind; skipped without a word.
_JUNK = re.compile(r"(^|/)(__MACOSX|\.[^/]*)(/|$)|(^|/)(Thumbs\.db|desktop\.ini)$", re.IGNORECASE)
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def plan_images(
    members: list[tuple[str, int]], skipped: list[dict[str, str]], what: str = "ZIP file"
) -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    """{split: {class: [names]}} and the checked class names of (name, size) members; refuses an unusable set.

    Names use "/" separators; the layout rules (one wrapping folder, train/val/test tops) are the same
    for a ZIP and for an imported folder.
    """
    layout = _layout(members, skipped)
    if not layout:
        raise DatasetError(no_images_message(skipped, what))
    if "train" not in layout:
        raise DatasetError(f"the {what} has val/ or test/ folders but no train/ folder")
    # Checked here, before any image is decoded: a folder name is a class name, with the same bounds.
    class_names = limits.check_class_names(sorted({cls for split in layout.values() for cls in split}))
    return layout, class_names


def _skip(skipped: list[dict[str, str]], name: str, reason: str) -> None:
    skipped.append({"name": name[:200], "reason": reason})


def no_images_message(skipped: list[dict[str, str]], what: str = "ZIP file") -> str:
    msg = f"the {what} holds no usable images; expected class folders of PNG/JPEG files (class/image.png)"
    if skipped:
        examples = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped[:3])
        msg += f". Skipped {len(skipped)} file(s), e.g. {examples}"
    return msg


def list_zip_members(path: Path) -> list[zipfile.ZipInfo]:
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
    return files


def is_junk(name: str) -> bool:
    """Files every OS or archiver leaves behind (__MACOSX, dot files, Thumbs.db): skipped without a word."""
    return bool(_JUNK.search(name))


def _layout(files: list[tuple[str, int]], skipped: list[dict[str, str]]) -> dict[str, dict[str, list[str]]]:
    """{split: {class: [member names]}} from the folder structure of (name, size) pairs."""
    # Some Windows archivers write backslashes as separators.
    parts = {name: posixpath.normpath(name.replace("\\", "/")).split("/") for name, _ in files}
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
    by_name = dict(files)
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
        if by_name[name] > MAX_IMAGE_FILE_BYTES:
            _skip(skipped, name, f"larger than {MAX_IMAGE_FILE_BYTES // 1024**2} MiB")
            continue
        layout.setdefault(split, {}).setdefault(p[0], []).append(name)
    return layout


def decode_image(data: bytes, size: tuple[int, int]) -> tuple[np.ndarray, bool] | str:
    """(uint8 HxWx3 pixels resized to `size`, is grayscale) or the reason the file was skipped.

    Pillow releases the GIL while decoding and resizing, so the store runs this in threads.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
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
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        return f"could not be decoded ({str(exc)[:80]})"
    pixels = np.asarray(rgb, dtype=np.uint8)
    if not gray:
        # A colour-mode file whose channels are all equal is a grayscale picture too.
        gray = bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())
    return pixels, gray
