"""The search pages in a real Chromium: fill the form, watch the search live to its end, open the best student."""

from __future__ import annotations

import re

import pytest

from tests.browser.helpers import make_npz, make_teacher, upload

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


def test_search_form_and_live_view(page, stack, token, tmp_path):
    npz = make_npz(tmp_path / "blobs.npz")
    upload(stack.url, token, "/api/datasets/", {"name": "search-blobs"}, npz)
    upload(stack.url, token, "/api/checkpoints/", {"name": "search-teacher"}, make_teacher(tmp_path, npz))

    page.goto(stack.url + "/searches/new/")
    page.select_option("#s-dataset", label="search-blobs")
    page.select_option(
        "#s-teacher", label=page.locator("#s-teacher option", has_text="search-teacher").inner_text()
    )
    page.select_option("#s-budget-kind", "max_params")
    page.fill("#s-budget-value", "800")
    page.fill("#s-trials", "3")
    page.fill("#s-epochs", "3")
    assert "9 trial-epochs" in page.inner_text("#s-estimate")
    page.check("input[name=method][value=dkd]")  # Hinton (checked by default) and DKD
    page.click("#s-submit")
    page.wait_for_url(re.compile(r".*/searches/\d+/$"))
    search_id = int(page.url.rstrip("/").rsplit("/", 1)[-1])
    # live: the page follows the search to its end without a reload
    page.wait_for_selector("#search[data-status=succeeded]", timeout=180_000)
    rows = page.locator("#trial-table tbody tr")
    assert rows.count() == 3
    methods = set(page.locator("#trial-table tbody td.method").all_inner_texts())
    assert methods and methods <= {"Hinton", "DKD"}, methods  # each trial shows the method it ran
    assert page.locator("#s-scatter canvas").count() >= 1
    assert page.locator("#best-trial").is_visible()
    assert page.locator("a#use-student").is_visible()  # the best trial exported its model
    assert page.locator("#trial-table tbody tr[data-exported=true] a.use").count() >= 1
    page.click("#use-student")
    page.wait_for_url("**/experiments/*/**")
    page.goto(stack.url + "/searches/")
    assert page.locator("#search-table tbody tr").count() >= 1
    best = page.locator(f"#search-table tbody tr[data-id='{search_id}'] td.best-acc").inner_text()
    assert best.endswith("%"), best  # the list shows the best trial's validation accuracy

    # A best trial without an exported model (here: its model file removed) gets a disabled button and why.
    stack.manage("shell", "-c", (
        "from webapp.studio.models import Artifact; from webapp.studio.search_models import Search; "
        f"s = Search.objects.get(pk={search_id}); "
        "from webapp.studio.search import search_json; "
        "Artifact.objects.filter(experiment_id=search_json(s)['best']).delete()"
    ))  # fmt: skip
    page.goto(stack.url + f"/searches/{search_id}/")
    page.wait_for_selector("#best-trial")
    assert page.locator("button#use-student").is_disabled()
    assert "weights were not kept" in page.inner_text("#use-student-why")
    assert [e for e in page.js_errors] == []


def test_bad_budget_is_explained(page, stack):
    page.goto(stack.url + "/searches/new/")
    page.wait_for_selector("#search-form[data-ready=true]")  # the page's script handles the submit
    page.fill("#s-budget-value", "3")
    page.click("#s-submit")
    page.wait_for_selector("#s-error .alert")
    assert page.inner_text("#s-error")
