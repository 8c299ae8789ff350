"""The newcomer's stumbles, in a real Chromium at 1280x800 and 390x844: errors in view with every bad field
marked, a teacher paired with its own dataset (and one that fits nothing offered no launch)."""

from __future__ import annotations

import re

import pytest

from tests.browser.conftest import DESKTOP, PHONE, SCREENSHOTS, login
from tests.browser.helpers import api, make_npz, make_teacher, upload

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

USER, PW = "browser-pairing", "pw-browser-pairing-42"
VIEWPORTS = pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280x800", "390x844"])


def odd_teacher(path_dir, features: int, classes: int):
    """An untrained mlp of another shape, exported by kd_core: a teacher none of the user's datasets fits."""
    import torch

    from kd_core.export import export_model
    from kd_core.models import build_model

    model = build_model({"arch": "mlp", "hidden": [8]}, (features,), classes).eval()
    names = [f"c{i}" for i in range(classes)]
    paths = export_model(model, path_dir, basename="odd", sample_inputs=torch.zeros(4, features),
                         formats=("safetensors",), class_names=names)  # fmt: skip
    return paths["safetensors"]


@pytest.fixture(scope="module")
def pairing(stack, tmp_path_factory):
    """Two datasets of the same shape (the teacher's own, and a newer one of random labels), a teacher uploaded
    for the first, and a five-class teacher that fits neither."""
    token = stack.make_user(USER, PW)
    d = tmp_path_factory.mktemp("pairing")
    own = upload(stack.url, token, "/api/datasets/", {"name": "blobs-own"}, make_npz(d / "own.npz"))
    teacher = make_teacher(d, d / "own.npz")
    ck = upload(
        stack.url, token, "/api/checkpoints/", {"name": "paired-teacher", "dataset": str(own["id"])}, teacher
    )
    newer = upload(
        stack.url, token, "/api/datasets/", {"name": "blobs-random"}, make_npz(d / "rnd.npz", seed=7)
    )
    odd = upload(stack.url, token, "/api/checkpoints/", {"name": "five-class"}, odd_teacher(d, 16, 5))
    return {"token": token, "own": own, "newer": newer, "checkpoint": ck, "odd": odd}


def _page(browser, stack, viewport):
    ctx = browser.new_context(viewport=viewport)
    ctx.set_default_timeout(20_000)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    login(page, stack.url, USER, PW)
    return ctx, page, errors


def in_view(page, selector: str) -> bool:
    box = page.locator(selector).bounding_box()
    size = page.viewport_size
    return box is not None and box["y"] >= 0 and box["y"] + min(box["height"], 80) <= size["height"]


def real(errors: list[str]) -> list[str]:
    """Errors other than the browser's own console line for an expected 400 answer."""
    return [e for e in errors if "status of 400" not in e]


def shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}-{page.viewport_size['width']}.png"))


@VIEWPORTS
def test_launch_errors_are_in_view_with_every_field_marked(browser, stack, pairing, viewport):
    ctx, page, errors = _page(browser, stack, viewport)
    try:
        page.goto(f"{stack.url}/experiments/new/?kind=distill&teacher={pairing['checkpoint']['id']}")
        page.wait_for_selector("#quick-launch-btn")
        page.fill("#f-epochs", "0")
        page.fill("#f-lr", "-1")
        page.fill("#f-temperature", "0")
        page.fill("#f-alpha", "2")
        page.evaluate("window.scrollTo(0, 0)")
        page.click("#quick-launch-btn")
        page.wait_for_selector("#launch-error")
        # Beside the button that was pressed, on screen, naming all four.
        assert page.locator("#quick-msg #launch-error").count() == 1
        assert in_view(page, "#launch-error")
        text = page.inner_text("#launch-error")
        for label in ("Epochs", "Learning rate", "Temperature T", "Alpha"):
            assert label in text
        marked = page.eval_on_selector_all(".field.invalid [aria-invalid=true]", "els => els.map(e => e.id)")
        assert sorted(marked) == ["f-alpha", "f-epochs", "f-lr", "f-temperature"]
        assert page.locator(".field.invalid .field-error").count() == 4
        shot(page, "launch-errors")
        # Fixing them clears the marks on the next attempt (which then launches).
        for field, value in (
            ("#f-epochs", "1"),
            ("#f-lr", "0.01"),
            ("#f-temperature", "4"),
            ("#f-alpha", "0.5"),
        ):
            page.fill(field, value)
        page.fill("#f-hidden", "4")
        page.click("#launch-btn")
        page.wait_for_url(re.compile(r".*/experiments/\d+/$"))
        assert real(errors) == []
    finally:
        ctx.close()


def test_bottom_button_errors_land_next_to_it(browser, stack, pairing):
    ctx, page, errors = _page(browser, stack, DESKTOP)
    try:
        page.goto(f"{stack.url}/experiments/new/?kind=train&dataset={pairing['own']['id']}")
        page.wait_for_selector("#f-dataset option", state="attached")
        page.fill("#f-epochs", "")
        page.fill("#f-hidden", "64, x")
        page.click("#launch-btn")
        page.wait_for_selector("#form-msg #launch-error")
        assert in_view(page, "#launch-error")
        marked = page.eval_on_selector_all("[aria-invalid=true]", "els => els.map(e => e.id)")
        assert sorted(marked) == ["f-epochs", "f-hidden"]
        assert "2 fields need a look" in page.inner_text("#launch-error")
        assert errors == []
    finally:
        ctx.close()


@VIEWPORTS
def test_a_teacher_comes_with_its_own_dataset_named(browser, stack, pairing, viewport):
    ctx, page, errors = _page(browser, stack, viewport)
    try:
        page.goto(f"{stack.url}/experiments/new/?kind=distill&teacher={pairing['checkpoint']['id']}")
        page.wait_for_selector("#quick-launch-btn")
        # Not the newest dataset of the same shape: the one it was uploaded for, named in the banner.
        assert page.input_value("#f-dataset") == str(pairing["own"]["id"])
        assert "“blobs-own”" in page.inner_text("#quick-launch h2")
        # The five-class teacher is listed apart and cannot be picked.
        odd = page.locator(f"#misfit-teachers option[value='{pairing['odd']['id']}']")
        assert odd.count() == 1 and odd.is_disabled()
        assert "5 classes" in odd.inner_text()
        shot(page, "teacher-paired")
        assert errors == []
    finally:
        ctx.close()


@VIEWPORTS
def test_a_teacher_that_fits_nothing_gets_no_launch(browser, stack, pairing, viewport):
    ctx, page, errors = _page(browser, stack, viewport)
    try:
        page.goto(f"{stack.url}/experiments/new/?kind=distill&teacher={pairing['odd']['id']}")
        page.wait_for_selector("#pair-note")
        assert page.locator("#quick-launch-btn").count() == 0
        note = page.inner_text("#pair-note")
        assert "“five-class” fits none of your datasets" in note and "5 classes" in note
        assert page.input_value("#f-teacher") != str(pairing["odd"]["id"])
        shot(page, "teacher-fits-nothing")
        assert errors == []
    finally:
        ctx.close()


def test_a_mismatch_is_refused_by_the_api_in_names(stack, pairing):
    import urllib.error

    body = {"kind": "distill", "dataset": pairing["own"]["id"], "teacher": pairing["odd"]["id"]}
    with pytest.raises(urllib.error.HTTPError) as info:
        api(stack.url, pairing["token"], "POST", "/api/experiments/", body)
    error = info.value.read().decode()
    assert "five-class" in error and "blobs-own" in error


def test_codistill_burn_in_follows_the_run_and_weight_decay_note_only_when_set(browser, stack, pairing):
    ctx, page, errors = _page(browser, stack, DESKTOP)
    try:
        page.goto(f"{stack.url}/experiments/new/?kind=codistill&dataset={pairing['own']['id']}")
        page.wait_for_selector("#f-dataset option", state="attached")
        page.select_option("#f-kind", "codistill")
        page.fill("#f-epochs", "2")
        # 600 samples: 420 for training, 7 batches of 64 per epoch, 14 steps: burn-in 3, not 200.
        assert page.input_value("#c-burn_in_steps") == "3"
        assert "~14 steps" in page.inner_text("#burn-in-note")
        assert page.is_hidden("#wd-note")
        page.fill("#f-weight_decay", "0.01")
        assert page.is_visible("#wd-note")
        page.fill("#c-burn_in_steps", "50")
        assert "never learn from each other" in page.inner_text("#burn-in-note")
        page.click("#launch-btn")
        page.wait_for_selector("#launch-error")
        assert "burn-in is 50 steps" in page.inner_text("#launch-error")
        assert page.eval_on_selector_all("[aria-invalid=true]", "els => els.map(e => e.id)") == [
            "c-burn_in_steps"
        ]
        assert real(errors) == []
    finally:
        ctx.close()


def wait_done(stack, token, exp_id: int, timeout: float = 120) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        e = api(stack.url, token, "GET", f"/api/experiments/{exp_id}/")
        if e["status"] in ("succeeded", "failed", "cancelled"):
            return e
        time.sleep(0.3)
    raise AssertionError(f"experiment {exp_id} did not finish")


def test_deleting_a_used_dataset_names_its_experiments(browser, stack, pairing, tmp_path):
    token = pairing["token"]
    ds = upload(
        stack.url, token, "/api/datasets/", {"name": "short-lived"}, make_npz(tmp_path / "s.npz", n=90)
    )
    exp = api(stack.url, token, "POST", "/api/experiments/", {
        "kind": "train", "name": "uses-short-lived", "dataset": ds["id"], "epochs": 1, "model": {"arch": "mlp", "hidden": [4]},
    })  # fmt: skip
    wait_done(stack, token, exp["id"])
    ctx, page, errors = _page(browser, stack, DESKTOP)
    try:
        page.goto(stack.url + "/datasets/")
        row = page.locator(f"#ds-table tr[data-id='{ds['id']}']")
        row.locator("a").first.click()  # its inspection is on show
        page.wait_for_function(f"document.querySelector('#inspection').dataset.datasetId === '{ds['id']}'")
        assert "training split" in page.inner_text("#balance-note")
        dialogs: list[str] = []
        page.once("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        row.locator("button", has_text="Delete").click()
        page.wait_for_timeout(300)
        assert (
            "“short-lived”" in dialogs[0]
            and "uses-short-lived" in dialogs[0]
            and "1 experiment(s)" in dialogs[0]
        )
        assert row.count() == 1  # dismissed: nothing deleted
        page.once("dialog", lambda d: d.accept())
        row.locator("button", has_text="Delete").click()
        page.wait_for_selector(f"#ds-table tr[data-id='{ds['id']}']", state="detached")
        # The inspection panel no longer shows the deleted dataset.
        assert "was deleted" in page.inner_text("#inspection")
        # The experiment's config says the dataset is gone rather than showing a bare id.
        page.goto(f"{stack.url}/experiments/{exp['id']}/")
        page.wait_for_selector("#config-kv dd")
        assert f"deleted (was dataset #{ds['id']})" in page.inner_text("#config-kv")
        assert errors == []
    finally:
        ctx.close()


def test_stop_from_the_list_asks_first(browser, stack, pairing):
    token = pairing["token"]
    exp = api(stack.url, token, "POST", "/api/experiments/", {
        "kind": "train", "name": "long-one", "dataset": pairing["own"]["id"], "epochs": 5000, "batch_size": 8,
        "model": {"arch": "mlp", "hidden": [4]},
    })  # fmt: skip
    ctx, page, errors = _page(browser, stack, PHONE)
    try:
        page.goto(stack.url + "/experiments/")
        stop = page.locator(f"#exp-table tr[data-id='{exp['id']}'] button[data-stop]")
        stop.wait_for()
        dialogs: list[str] = []
        page.once("dialog", lambda d: (dialogs.append(d.message), d.accept()))
        stop.click()
        assert "“long-one”" in dialogs[0]
        assert wait_done(stack, token, exp["id"], timeout=60)["status"] == "cancelled"
        # The form's way out says where it goes, not "Cancel".
        page.goto(stack.url + "/experiments/new/")
        assert page.inner_text("#leave-form") == "Back to experiments"
        assert errors == []
    finally:
        ctx.close()


@VIEWPORTS
def test_no_sideways_overflow_and_actions_reachable(browser, stack, pairing, viewport):
    ctx, page, errors = _page(browser, stack, viewport)
    try:
        for path, table in (("/teachers/", "#ck-table"), ("/teachers/", "#trained-table"), ("/datasets/", "#ds-table"),
                            ("/experiments/", "#exp-table")):  # fmt: skip
            page.goto(stack.url + path)
            page.wait_for_selector(f"{table} tbody tr[data-id]")
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= viewport["width"], f"{path} is {width}px wide"
            # Every action button is on screen without scrolling the table sideways.
            for box in page.eval_on_selector_all(
                f"{table} tbody .btn", "els => els.map(e => e.getBoundingClientRect().right)"
            ):
                assert box <= viewport["width"], f"an action button on {path} ends at {box}px"
            page.screenshot(
                path=str(SCREENSHOTS / f"actions{path.replace('/', '-')}{viewport['width']}.png"),
                full_page=True,
            )
        assert errors == []
    finally:
        ctx.close()


def test_model_card_spells_out_the_input_contract_and_its_snippets_run(browser, stack, pairing, tmp_path):
    import subprocess
    import sys
    import urllib.request

    token = pairing["token"]
    exp = api(stack.url, token, "POST", "/api/experiments/", {
        "kind": "train", "name": "contract run", "dataset": pairing["own"]["id"], "epochs": 2, "model": {"arch": "mlp", "hidden": [8]},
    })  # fmt: skip
    assert wait_done(stack, token, exp["id"])["status"] == "succeeded"
    ctx, page, errors = _page(browser, stack, DESKTOP)
    try:
        page.goto(f"{stack.url}/experiments/{exp['id']}/")
        page.click("#call-it summary")
        page.wait_for_selector("#input-contract")
        contract = page.inner_text("#input-contract")
        for part in ("input", "(batch, 16)", "float32", "ant, bee, cat", "logits"):
            assert part in contract
        onnx_code = page.inner_text("#snippet-onnx")
        torch_code = page.inner_text("#snippet-torch")
        page.screenshot(path=str(SCREENSHOTS / "model-card-contract-1280.png"), full_page=True)
        assert errors == []
    finally:
        ctx.close()
    # The snippets run as pasted, next to the downloaded files, and print a class name.
    for fmt, suffix in (("onnx", "onnx"), ("torchscript", "ts")):
        req = urllib.request.Request(f"{stack.url}/api/experiments/{exp['id']}/download/?format={fmt}")
        req.add_header("Authorization", f"Token {token}")
        with urllib.request.urlopen(req, timeout=30) as r:
            (tmp_path / f"contract-run-{exp['id']}.{suffix}").write_bytes(r.read())
    for code in (onnx_code, torch_code):
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() in ("ant", "bee", "cat")
