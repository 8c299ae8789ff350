"""A newcomer's path in a real Chromium: the first page offers "Distill it now", and the result is stated plainly."""

from __future__ import annotations

import re

import pytest

from tests.browser.conftest import DESKTOP, PHONE, login
from tests.browser.helpers import api, make_npz, make_teacher, upload

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

NEWCOMER, NEWCOMER_PW = "browser-newcomer", "pw-browser-newcomer-42"


@pytest.fixture(scope="module")
def newcomer(stack, tmp_path_factory):
    """A user with a dataset and a teacher and no experiment yet: what `make run` gives after its demo teacher."""
    token = stack.make_user(NEWCOMER, NEWCOMER_PW)
    d = tmp_path_factory.mktemp("newcomer")
    npz = make_npz(d / "blobs.npz")
    ds = upload(stack.url, token, "/api/datasets/", {"name": "blobs"}, npz)
    ck = upload(stack.url, token, "/api/checkpoints/", {"name": "first-teacher"}, make_teacher(d, npz))
    return {"token": token, "dataset": ds, "checkpoint": ck}


def _page(browser, stack, viewport):
    ctx = browser.new_context(viewport=viewport)
    ctx.set_default_timeout(20_000)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    login(page, stack.url, NEWCOMER, NEWCOMER_PW)
    return ctx, page, errors


def test_first_page_offers_distil_and_the_card_states_the_result(browser, stack, newcomer):
    ctx, page, errors = _page(browser, stack, DESKTOP)
    try:
        ck = newcomer["checkpoint"]
        # The page a newcomer lands on names the teacher and offers one button to distill it.
        page.wait_for_selector("#start-distil")
        assert "first-teacher" in page.inner_text("#start-distil")
        page.click("#distil-now")
        page.wait_for_url(re.compile(rf".*/experiments/new/\?kind=distill&teacher={ck['id']}$"))
        # The form arrives ready to launch, with the launch button at its top: distill, this teacher,
        # a dataset it fits, a student smaller than it.
        page.wait_for_selector("#quick-launch-btn")
        assert "smaller than the teacher" in page.inner_text("#quick-summary")
        assert page.input_value("#f-kind") == "distill"
        assert page.input_value("#f-teacher") == str(ck["id"])
        assert page.input_value("#f-dataset") == str(newcomer["dataset"]["id"])
        assert "smaller than the teacher" in page.inner_text("#size-ratio")
        page.fill("#f-hidden", "8")
        page.fill("#f-epochs", "8")
        page.click("#quick-launch-btn")
        page.wait_for_url(re.compile(r".*/experiments/\d+/$"))
        page.wait_for_selector("#exp-status [data-status=succeeded]", timeout=120_000)
        page.wait_for_selector("#model-card:not(.hidden)")
        # Accuracy against the teacher, compression and speed-up in one sentence, with units.
        verdict = page.inner_text("#card-verdict")
        assert re.search(
            r"reaches \d+\.\d% test accuracy against the teacher's \d+\.\d% \([+−]\d+\.\d points\)", verdict
        )
        assert re.search(r"\d+(\.\d+)?× fewer parameters", verdict)
        assert re.search(r"\d+(\.\d+)?× (faster|slower) on one CPU sample", verdict)
        assert "per sample" in page.inner_text("[data-metric=student_latency_ms]")
        # Latency with its spread, for the student and its teacher, and how it was measured, in words.
        for who in ("student", "teacher"):
            spread = page.inner_text(f"[data-metric={who}_latency_ms] .latency-spread")
            lo, hi = (float(v) for v in re.search(r"p10–p90: ([\d.]+)–([\d.]+) ms", spread).groups())
            assert lo <= hi, spread
        card_note = page.inner_text("#card-note")
        assert re.search(
            r"median of [\d.,]+k? single-sample CPU calls .*\(batch size 1, \d+ CPU threads?\)", card_note
        )
        assert "p10–p90" in card_note
        # An 8-unit MLP student: the card says its time is mostly per-call overhead, not arithmetic.
        assert re.search(
            r"about \d+% of this student's time per sample is fixed per-call overhead", card_note
        )
        # Off the chart, the legend shows the latest values instead of blanks.
        page.wait_for_function(
            "[...document.querySelectorAll('.chart[data-chart=loss] .u-legend .u-value')].some((v) => /\\d/.test(v.textContent))"
        )
        # Axis labels keep neighbouring ticks apart (a slowly decaying learning rate).
        ticks = page.evaluate(
            "async () => (await import('kd/charts.js')).fmtTicks([0.001, 0.000995, 0.00099, 0.000985])"
        )
        assert len(set(ticks)) == 4, ticks
        # The loss axis: log on demand, linear on demand.
        page.click("#yaxis button[data-v=log]")
        page.wait_for_selector(".chart[data-chart=loss][data-logy='1']")
        assert page.get_attribute("#yaxis button[data-v=log]", "aria-pressed") == "true"
        page.click("#yaxis button[data-v=linear]")
        page.wait_for_selector(".chart[data-chart=loss][data-logy='0']")
        # Once a distillation exists the first-run card steps aside.
        page.goto(stack.url + "/experiments/")
        page.wait_for_selector("#exp-table tbody tr[data-id]")
        assert page.locator("#start-distil").count() == 0
        assert "vs teacher" in page.inner_text("#exp-table tbody tr[data-id]:first-child")
        assert errors == []
    finally:
        ctx.close()


def test_a_failed_run_says_why_and_what_next(browser, stack, newcomer):
    token = newcomer["token"]
    # Valid to the API, fatal at run time: a learning rate this high sends the loss to NaN within a few steps.
    created = api(stack.url, token, "POST", "/api/experiments/", {
        "kind": "train", "name": "nan-run", "dataset": "digits", "epochs": 3, "seed": 0,
        "model": {"arch": "mlp", "hidden": [512, 512, 512]}, "lr": 10, "optimizer": "sgd", "momentum": 0.99,
        "schedule": "none",
    })  # fmt: skip
    ctx, page, errors = _page(browser, stack, PHONE)
    try:
        page.goto(f"{stack.url}/experiments/{created['id']}/")
        page.wait_for_selector("#exp-status [data-status=failed]", timeout=120_000)
        text = page.inner_text("#error-text")
        assert "became nan" in text and "lower learning rate" in text
        assert page.get_attribute("#error-text a", "href") == f"/experiments/new/?clone={created['id']}"
        # The charts do not promise points that will never come.
        if page.is_visible("#charts-empty"):
            assert "failed" in page.inner_text("#charts-empty")
        # The list says why in the row, and the page fits a phone.
        page.goto(stack.url + "/experiments/?status=failed")
        row_error = page.wait_for_selector(f"tr[data-id='{created['id']}'] .row-error")
        assert "became nan" in row_error.inner_text()
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        assert errors == []
    finally:
        ctx.close()
