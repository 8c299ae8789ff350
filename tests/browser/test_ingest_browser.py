"""Issue 8's path in a real Chromium on a real stack, scaled down: upload a ZIP of class-folder JPEGs, watch the
worker ingest it on the Datasets page (no reload), train a teacher and distill a student from the forms, download
the student from its model card and run it on the images."""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.browser.conftest import DESKTOP, SCREENSHOTS, login
from tests.stack import Stack, start_stack

pytestmark = [pytest.mark.browser, pytest.mark.timeout(420)]

USER, PW = "browser-ingest", "pw-browser-ingest-42"
CLASSES, PER_CLASS, SIDE, STORED_SIDE = 4, 120, 224, 24


def class_images(seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """HxWx3 uint8 images: a stripe direction and colour per class, a random phase, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    images, labels = [], []
    for c in range(CLASSES):
        angle, colour = (
            c * np.pi / CLASSES,
            np.array([(c * 67) % 256, (c * 131) % 256, 200], np.float32) / 255,
        )
        for _ in range(PER_CLASS):
            stripes = 0.5 + 0.5 * np.sin(
                2 * np.pi * 4 * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 6.3)
            )
            img = stripes[..., None] * (0.3 + 0.7 * colour) + rng.normal(0, 0.1, (SIDE, SIDE, 3))
            images.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
            labels.append(c)
    return images, labels


def zip_of_jpegs(path: Path, images: list[np.ndarray], labels: list[int]) -> Path:
    from PIL import Image

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for i, (img, label) in enumerate(zip(images, labels)):
            buffer = io.BytesIO()
            Image.fromarray(img).save(buffer, format="JPEG", quality=85)
            zf.writestr(f"shapes/class{label}/img{i:04d}.jpg", buffer.getvalue())
    return path


@pytest.fixture(scope="module")
def ingest_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own: uploads above 1 MiB go to the worker (the browser package's stack keeps 16 MiB)."""
    stack = start_stack(
        tmp_path_factory.mktemp("ingest-stack"), extra_env={"KD_SYNC_INGEST_MAX_BYTES": str(1024 * 1024)}
    )
    try:
        stack.make_user(USER, PW)
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def ingest_page(browser, ingest_stack: Stack, request: pytest.FixtureRequest) -> Iterator:
    ctx = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    ctx.set_default_timeout(20_000)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.js_errors = errors
    login(page, ingest_stack.url, USER, PW)
    try:
        yield page
    finally:
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "ingest_browser_failure.png"), full_page=True)
        ctx.close()


def wait_succeeded(page) -> int:
    """On an experiment page: wait for the job to succeed; its id."""
    page.wait_for_url(re.compile(r".*/experiments/\d+/$"))
    page.wait_for_selector("#exp-status [data-status=succeeded]", timeout=180_000)
    return int(page.url.rstrip("/").rsplit("/", 1)[1])


def test_upload_watch_ingest_distill_and_download_the_student(ingest_page, ingest_stack, tmp_path):
    import onnxruntime as ort
    from PIL import Image

    page = ingest_page
    images, labels = class_images()
    archive = zip_of_jpegs(tmp_path / "shapes.zip", images, labels)
    assert archive.stat().st_size > 1024 * 1024  # above the stack's threshold: the worker ingests it

    page.goto(ingest_stack.url + "/datasets/")
    page.wait_for_selector("#ds-table tbody tr")
    # Record every status the list and the panel show, to check they move on their own (no reload).
    page.evaluate(
        """() => { window.__sameDocument = true; window.__seen = [];
        const note = () => {
          for (const tr of document.querySelectorAll('#ds-table tbody tr[data-id]')) {
            const badge = tr.querySelector('.badge');
            const last = window.__seen[window.__seen.length - 1];
            if (badge && !(last && last[0] === tr.dataset.id && last[1] === badge.textContent))
              window.__seen.push([tr.dataset.id, badge.textContent]);
          }
        };
        new MutationObserver(note).observe(document.querySelector('#ds-table'),
          {subtree: true, childList: true, characterData: true}); }"""
    )
    page.set_input_files("#ds-file", str(archive))
    assert page.is_visible("#size-field") and page.is_hidden("#label-field")  # a ZIP asks for the image size
    page.fill("#ds-size", str(STORED_SIDE))
    page.click("#upload-btn")
    # The answer is 202 "ingesting": the page says a worker has it, then lists it with its progress.
    page.wait_for_selector("#upload-ingesting")
    row = page.locator("#ds-table tbody tr", has_text="shapes")
    row.wait_for()
    dataset_id = row.get_attribute("data-id")
    row.locator(".badge", has_text="ready").wait_for(timeout=120_000)
    assert page.evaluate("window.__sameDocument === true")
    seen = [text for ds, text in page.evaluate("window.__seen") if ds == dataset_id]
    print("statuses shown:", seen)
    assert re.fullmatch(r"ingesting \d+%", seen[0]), seen
    assert seen[-1] == "ready" and all(re.fullmatch(r"ingesting \d+%|ready", t) for t in seen), seen
    # The panel follows too: the finished inspection replaces "ingesting" without a reload.
    n = CLASSES * PER_CLASS
    page.wait_for_selector(f"#inspection[data-status=ready][data-dataset-id='{dataset_id}']")
    stats = page.inner_text("#ds-stats")
    assert f"{n}" in stats and f"(3 × {STORED_SIDE} × {STORED_SIDE})" in stats, stats
    assert page.locator("#class-balance .bar").count() == CLASSES
    assert page.locator("#sample-grid img").count() > 0
    assert page.locator("#ds-ingesting").count() == 0

    # A teacher trained on it from the form ("Use" on the dataset's row).
    row.locator("a", has_text="Use").click()
    page.wait_for_selector("#f-dataset option", state="attached")
    page.select_option("#f-kind", "train")
    assert page.input_value("#f-dataset") == dataset_id
    page.fill("#f-name", "shapes-teacher")
    page.select_option("#f-arch", "cnn")
    page.fill("#f-channels", "8, 16")
    page.fill("#f-hidden", "32")
    page.fill("#f-epochs", "4")
    page.click("#launch-btn")
    wait_succeeded(page)

    # "Distill this model" on its page, into a small mlp student.
    page.wait_for_selector("#distil-btn[href*='kind=distill']")
    page.click("#distil-btn")
    page.wait_for_selector("#f-teacher option", state="attached")
    assert page.input_value("#f-kind") == "distill" and page.input_value("#f-dataset") == dataset_id
    page.fill("#f-name", "shapes-student")
    page.select_option("#f-arch", "mlp")
    page.fill("#f-hidden", "32")
    page.fill("#f-epochs", "4")
    page.click("#launch-btn")
    wait_succeeded(page)
    page.wait_for_selector("#model-card:not(.hidden)")
    assert "%" in page.inner_text("[data-metric=test_acc]")

    # The student, downloaded from its card, classifies the images it was made from (raw pixels / 255).
    with page.expect_download() as download:
        page.click("#downloads a[data-format=onnx]")
    student = tmp_path / "student.onnx"
    download.value.save_as(student)
    pick = np.random.default_rng(1).choice(len(images), 64, replace=False)
    x = np.stack([
        np.asarray(Image.fromarray(images[i]).resize((STORED_SIDE, STORED_SIDE), Image.Resampling.BILINEAR))
        for i in pick
    ]).transpose(0, 3, 1, 2).astype(np.float32) / 255  # fmt: skip
    session = ort.InferenceSession(str(student), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    assert logits.shape == (64, CLASSES)
    accuracy = float((logits.argmax(1) == np.asarray(labels)[pick]).mean())
    assert accuracy > 1.5 / CLASSES, accuracy  # it learned the classes, not chance
    assert page.js_errors == [], page.js_errors
