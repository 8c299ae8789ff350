"""Import without upload: every way out of KD_IMPORT_ROOT is refused with 400 and nothing is written.

An unreadable file under the root is accepted (the request cannot know) and then fails on the worker with
the reason, leaving no store; the original files are never modified.
"""

from __future__ import annotations

import ctypes
import io
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings

from webapp.studio.models import Dataset

pytestmark = pytest.mark.django_db


def _npz(path: Path, n: int = 60) -> Path:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32), y=np.arange(n) % 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def tree(tmp_path, settings):
    """root/ with a good file, a good folder of class folders, and a secret outside the root."""
    from PIL import Image

    root = tmp_path / "import-root"
    _npz(root / "tables" / "good.npz")
    for label in ("cats", "dogs"):
        for i in range(6):
            (root / "pics" / label).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (40 * i, 200 if label == "cats" else 0, 90)).save(
                root / "pics" / label / f"{i}.png"
            )
    outside = tmp_path / "secret"
    _npz(outside / "secret.npz")
    settings.KD_IMPORT_ROOT = str(root)
    return root, outside


def post(client, body):
    return client.post("/api/datasets/", body, content_type="application/json")


def nothing_written() -> bool:
    media = Path(settings.MEDIA_ROOT)
    return not Dataset.objects.exists() and not (
        media.exists() and any(p.is_file() for p in media.rglob("*"))
    )


def test_unset_root_is_400_saying_how_to_enable_it(owner_client, settings):
    settings.KD_IMPORT_ROOT = ""
    response = post(owner_client, {"name": "x", "import_path": "tables/good.npz"})
    assert response.status_code == 400 and "KD_IMPORT_ROOT" in response.json()["error"]
    assert nothing_written()


@pytest.mark.parametrize(
    "given",
    [
        "../secret/secret.npz",
        "tables/../../secret/secret.npz",
        "tables/../..",
        "..",
        "/etc/passwd",
        "//etc/passwd",
        "\\\\server\\share\\x.npz",
        "C:\\data\\x.npz",
        "",
        ".",
        "tables/missing.npz",
        "tables/good.npz\x00.csv",
        "a" * 2000,
    ],
)
def test_paths_leaving_or_missing_the_root_are_400(owner_client, tree, given):
    response = post(owner_client, {"name": "x", "import_path": given})
    assert response.status_code == 400, response.content
    assert response.json()["error"]
    assert nothing_written()


def test_an_absolute_path_inside_the_root_is_still_refused(owner_client, tree):
    root, _ = tree
    response = post(owner_client, {"import_path": str(root / "tables" / "good.npz")})
    assert response.status_code == 400 and "relative" in response.json()["error"]
    assert nothing_written()


def test_symlinks_pointing_outside_are_400(owner_client, tree):
    root, outside = tree
    (root / "link.npz").symlink_to(outside / "secret.npz")
    (root / "linkdir").symlink_to(outside)
    (root / "pics" / "cats" / "leak.png").symlink_to(outside / "secret.npz")
    for given in ("link.npz", "linkdir/secret.npz", "linkdir", "pics"):
        response = post(owner_client, {"name": "x", "import_path": given})
        assert response.status_code == 400, (given, response.content)
        assert "outside" in response.json()["error"], response.json()
    assert nothing_written()


def test_a_symlinked_folder_inside_the_folder_pointing_out_is_400(owner_client, tree):
    root, outside = tree
    (root / "pics" / "dogs" / "more").symlink_to(outside)
    response = post(owner_client, {"import_path": "pics"})
    assert response.status_code == 400 and "outside the imported folder" in response.json()["error"]
    assert nothing_written()


def test_a_good_file_and_folder_are_ingested_in_place_and_left_unchanged(owner_client, tree):
    from workers import ingest

    root, _ = tree
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    file_body = post(owner_client, {"name": "tbl", "import_path": "tables/good.npz"})
    folder_body = post(owner_client, {"import_path": "pics/"})
    assert file_body.status_code == folder_body.status_code == 202, (file_body.content, folder_body.content)
    assert file_body.json()["status"] == "ingesting" and file_body.json()["import_path"] == "tables/good.npz"
    assert folder_body.json()["format"] == "folder" and folder_body.json()["name"] == "pics"
    assert ingest.run(file_body.json()["id"]) == "ready"
    assert ingest.run(folder_body.json()["id"]) == "ready"
    pics = owner_client.get(f"/api/datasets/{folder_body.json()['id']}/").json()
    assert pics["num_samples"] == 12 and pics["class_names"] == ["cats", "dogs"]
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before  # read in place, never modified or deleted


@contextmanager
def without_read_override():
    """This thread (and threads it starts) without CAP_DAC_OVERRIDE/READ_SEARCH: root obeys file modes too.

    Only the effective set is cleared; the permitted set is kept, so it is restored on exit.
    """
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        ]

    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    saved = (Data * 2)()
    if libc.capget(ctypes.byref(header), saved) != 0:
        pytest.skip("capget is not available")
    dropped = (Data * 2)(*[Data(d.effective, d.permitted, d.inheritable) for d in saved])
    dropped[0].effective &= ~((1 << 1) | (1 << 2))  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.capset(ctypes.byref(header), dropped) != 0:
        pytest.skip("capset is not allowed here")
    try:
        yield
    finally:
        libc.capset(ctypes.byref(Header(0x20080522, 0)), saved)


def test_an_unreadable_file_fails_with_the_reason_and_writes_nothing(owner_client, tree):
    from workers import ingest

    root, _ = tree
    locked = _npz(root / "tables" / "locked.npz")
    locked.chmod(0)
    try:
        response = post(owner_client, {"import_path": "tables/locked.npz"})
        assert response.status_code == 202, response.content  # the request cannot know
        with without_read_override():
            assert ingest.run(response.json()["id"]) == "failed"
    finally:
        locked.chmod(0o644)
    row = Dataset.objects.get(pk=response.json()["id"])
    assert row.status == "failed" and "locked.npz" in row.error
    assert "cannot be read" in row.error or "ermission denied" in row.error, row.error
    media = Path(settings.MEDIA_ROOT)
    assert not (media.exists() and any(p.is_file() for p in media.rglob("*")))


def test_a_file_removed_before_the_worker_reads_it_fails_with_the_reason(owner_client, tree):
    from workers import ingest

    root, _ = tree
    doomed = _npz(root / "tables" / "doomed.npz")
    response = post(owner_client, {"import_path": "tables/doomed.npz"})
    assert response.status_code == 202
    doomed.unlink()
    assert ingest.run(response.json()["id"]) == "failed"
    row = Dataset.objects.get(pk=response.json()["id"])
    assert "does not exist" in row.error


def test_the_quota_counts_what_an_import_will_read(owner_client, tree, settings):
    settings.KD_STORAGE_QUOTA_BYTES = 100
    response = post(owner_client, {"import_path": "tables/good.npz"})
    assert response.status_code == 413 and "quota" in response.json()["error"]
    assert nothing_written()
