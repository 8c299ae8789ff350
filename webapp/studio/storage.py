"""Storage helpers: local paths for stored files, streaming saves, and the upload size limit."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath

from django.conf import settings
from django.core.files import File
from django.core.files.storage import Storage, default_storage
from django.core.files.uploadhandler import FileUploadHandler, StopUpload


class MaxSizeUploadHandler(FileUploadHandler):
    """Stops an upload as soon as it passes settings.KD_MAX_UPLOAD_BYTES, before it fills the disk.

    It runs first among the upload handlers; when it stops a request it marks it
    (`request.upload_too_large`) so the view can answer 413 with the limit.
    """

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        self.limit = settings.KD_MAX_UPLOAD_BYTES
        self.received = 0
        # The parser does not catch StopUpload here, so a declared oversize body stops at the first file.
        self.declared_too_large = bool(content_length and content_length > self.limit + 64 * 1024)

    def new_file(self, *args, **kwargs):
        super().new_file(*args, **kwargs)
        if self.declared_too_large:
            self.request.upload_too_large = True
            raise StopUpload(connection_reset=True)

    def receive_data_chunk(self, raw_data, start):
        self.received += len(raw_data)
        if self.received > self.limit:
            self.request.upload_too_large = True
            raise StopUpload(connection_reset=True)
        return raw_data

    def file_complete(self, file_size):
        return None


@contextmanager
def local_path(field_file, storage: Storage | None = None) -> Iterator[Path]:
    """A filesystem path for a stored file: the file itself on local storage, else a temporary copy.

    The copy keeps the original suffix (kd_core picks the reader by extension) and is removed on exit.
    """
    storage = storage or getattr(field_file, "storage", None) or default_storage
    name = field_file if isinstance(field_file, str) else field_file.name
    try:
        yield Path(storage.path(name))
        return
    except NotImplementedError:
        pass  # remote storage (S3 and friends): download below
    suffix = "".join(PurePath(name).suffixes[-1:])
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=os.environ.get("KD_TMP_DIR"))
    try:
        with os.fdopen(fd, "wb") as out, storage.open(name, "rb") as src:
            shutil.copyfileobj(src, out, 1024 * 1024)
        yield Path(tmp)
    finally:
        os.unlink(tmp)


def save_local_file(
    path: str | os.PathLike, name: str, storage: Storage | None = None
) -> tuple[str, int, str]:
    """Copy a local file into storage under `name` (streamed); returns (stored name, size, sha256)."""
    storage = storage or default_storage
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(chunk)
        fh.seek(0)
        stored = storage.save(name, File(fh, name=PurePath(name).name))
    return stored, os.path.getsize(path), digest.hexdigest()


def delete_quietly(name: str, storage: Storage | None = None) -> None:
    """Remove a stored file and its now-empty per-upload folder; a missing file is not an error."""
    if not name:
        return
    storage = storage or default_storage
    try:
        storage.delete(name)
    except FileNotFoundError:
        pass
    try:
        folder = Path(storage.path(str(PurePath(name).parent)))
        if folder.is_dir() and not any(folder.iterdir()) and folder != Path(settings.MEDIA_ROOT):
            folder.rmdir()
    except (NotImplementedError, OSError):
        pass
