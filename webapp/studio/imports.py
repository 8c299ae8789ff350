"""Import without upload: resolve an `import_path` under the operator's KD_IMPORT_ROOT, refusing any escape.

The path is relative to the root; absolute paths, `..` parts and symlinks leading outside the root (the
path itself or a folder on the way) are refused, and so is any symlink inside an imported folder pointing
outside that folder.
The same check runs in the request (a 400) and again on the worker before reading (the tree may have
changed since), where a refusal fails the dataset with the reason.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from django.conf import settings

from kd_core.errors import DatasetError

FILE_FORMATS = {".npz": "npz", ".csv": "csv", ".zip": "zip"}
MAX_IMPORT_PATH_CHARS = 1000
ENABLE_HINT = (
    "importing from the server is off: the operator enables it by setting KD_IMPORT_ROOT to a folder the "
    "web app and the workers can read (e.g. KD_IMPORT_ROOT=/data/datasets); import_path is then relative to it"
)


class ImportRefused(DatasetError):
    """The import path is not allowed (escapes the root, missing, wrong kind); the reason is in words."""


@dataclass
class ImportSource:
    relative: str  # as stored on the row: normalised, relative to the root
    path: Path  # absolute, resolved
    format: str  # npz, csv, zip or folder
    size: int  # bytes of the files that will be read


def import_root() -> Path | None:
    """KD_IMPORT_ROOT resolved, or None when importing is off."""
    root = getattr(settings, "KD_IMPORT_ROOT", "") or ""
    return Path(root).resolve() if root else None


def resolve(given: object, root: Path | None = None) -> ImportSource:
    """Check `given` against the root and describe what it names; raises ImportRefused saying why not."""
    root = root or import_root()
    if root is None:
        raise ImportRefused(ENABLE_HINT)
    relative = _relative(given)
    candidate = root.joinpath(*relative.parts)
    try:
        target = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise ImportRefused(f"import_path {str(given)!r} does not exist under the import root") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise ImportRefused(f"import_path {str(given)!r} cannot be resolved: {exc.strerror or exc}") from None
    if not _inside(target, root):
        raise ImportRefused(f"import_path {str(given)!r} leads outside the import root (through a symlink)")
    mode = os.stat(target).st_mode
    if stat.S_ISDIR(mode):
        return ImportSource(relative.as_posix(), target, "folder", _check_tree(target, root, relative))
    if not stat.S_ISREG(mode):
        raise ImportRefused(f"import_path {str(given)!r} is neither a regular file nor a folder")
    fmt = FILE_FORMATS.get(target.suffix.lower()) or FILE_FORMATS.get(candidate.suffix.lower())
    if fmt is None:
        raise ImportRefused(
            f"import_path {str(given)!r} must be a folder of class folders or a file ending in "
            f"{', '.join(FILE_FORMATS)}"
        )
    return ImportSource(relative.as_posix(), target, fmt, os.stat(target).st_size)


def _relative(given: object) -> PurePosixPath:
    if not isinstance(given, str) or not given.strip():
        raise ImportRefused("'import_path' must be a non-empty path relative to the import root")
    if len(given) > MAX_IMPORT_PATH_CHARS or "\x00" in given:
        raise ImportRefused(f"'import_path' must be at most {MAX_IMPORT_PATH_CHARS} characters, without NUL")
    path = PurePosixPath(given)
    if path.is_absolute() or PureWindowsPath(given).is_absolute() or given.startswith("\\"):
        raise ImportRefused(f"import_path {given!r} must be relative to the import root, not absolute")
    parts = [p for p in path.parts if p not in ("", ".")]
    if ".." in parts or any("\\" in p for p in parts):
        raise ImportRefused(f"import_path {given!r} must not contain '..': it would leave the import root")
    if not parts:
        raise ImportRefused("'import_path' must name a file or folder under the import root, not the root")
    return PurePosixPath(*parts)


def _inside(target: Path, root: Path) -> bool:
    return target == root or root in target.parents


def _check_tree(folder: Path, root: Path, shown: PurePosixPath) -> int:
    """Every symlink under `folder` must point inside it (the rule kd_core's folder reader applies while it
    reads, so a refusal comes now as a 400 rather than later as a failed dataset); returns the bytes of
    its regular files. Symlinked folders are not followed (no loops, no duplicates)."""
    total = 0
    stack = [(folder, shown)]
    while stack:
        here, label = stack.pop()
        try:
            entries = list(os.scandir(here))
        except OSError as exc:
            raise ImportRefused(f"{label}: the folder cannot be listed ({exc.strerror or exc})") from None
        for entry in entries:
            name = label / entry.name
            if entry.is_symlink():
                try:
                    target = Path(entry.path).resolve(strict=True)
                except (OSError, RuntimeError):
                    continue  # dangling: the reader refuses it as unreadable, with its name
                if not _inside(target, folder):
                    raise ImportRefused(f"{name} is a symlink pointing outside the imported folder")
                if target.is_file():
                    total += target.stat().st_size
            elif entry.is_dir(follow_symlinks=False):
                stack.append((Path(entry.path), name))
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    return total
