"""The search pages in a real Chromium: fill the form, watch the search live to its end, open the best student."""

from __future__ import annotations

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
    page.click("#s-submit")
    page.wait_for_url("**/searches/*/")
    # live: the page follows the search to its end without a reload
    page.wait_for_selector("#search[data-status=succeeded]", timeout=180_000)
    rows = page.locator("#trial-table tbody tr")
    assert rows.count() == 3
    assert page.locator("#s-scatter canvas").count() >= 1
    assert page.locator("#best-trial").is_visible()
    page.click("#use-student")
    page.wait_for_url("**/experiments/*/**")
    page.goto(stack.url + "/searches/")
    assert page.locator("#search-table tbody tr").count() >= 1
    assert [e for e in page.js_errors] == []


def test_bad_budget_is_explained(page, stack):
    page.goto(stack.url + "/searches/new/")
    page.fill("#s-budget-value", "3")
    page.wait_for_function("document.querySelector('#s-teacher').options.length >= 0")
    page.click("#s-submit")
    page.wait_for_selector("#s-error .alert")
    assert page.inner_text("#s-error")
