"""The new-experiment form explains each distillation method in a line naming its paper; a DIST run launched from
it shows the student's agreement with the teacher and the KL to it on the model card."""

from __future__ import annotations

import json
import re

import pytest

from tests.browser.helpers import api, make_npz, make_teacher, upload

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


def visible_help(page) -> str:
    """The method explanations a reader sees now (hidden lines left out)."""
    return page.eval_on_selector_all(
        "#method-help li:not([hidden])", "els => els.map(e => e.innerText).join('\\n')"
    )


def test_pick_dkd_and_dist_read_their_papers_and_see_fidelity_on_the_card(page, stack, token, tmp_path):
    npz = make_npz(tmp_path / "blobs.npz")
    ds = upload(stack.url, token, "/api/datasets/", {"name": "blobs-methods"}, npz)
    ck = upload(
        stack.url, token, "/api/checkpoints/", {"name": "methods-teacher"}, make_teacher(tmp_path, npz)
    )
    page.goto(f"{stack.url}/experiments/new/?kind=distill&dataset={ds['id']}&teacher={ck['id']}")
    page.wait_for_function(f"document.querySelector('#f-teacher').value === '{ck['id']}'")

    # Hinton by default: its paper, and logit standardisation's, which applies to it.
    text = visible_help(page)
    assert "Distilling the Knowledge in a Neural Network" in text and "Hinton, Vinyals & Dean 2015" in text
    assert "Logit Standardization in Knowledge Distillation" in text
    assert page.get_attribute("#f-method", "aria-describedby") == "method-help"

    page.select_option("#f-method", "dkd")
    text = visible_help(page)
    assert "Zhao et al., CVPR 2022" in text and "Decoupled Knowledge Distillation" in text
    assert "Distilling the Knowledge" not in text and "Stronger Teacher" not in text
    assert page.is_visible("#f-dkd-beta") and page.is_visible("#f-logit_standardization")
    assert not page.is_visible("#f-alpha")  # Hinton's alpha does not apply to DKD
    assert page.input_value("#f-dkd-warmup_epochs") == "2.5"  # the paper's 20 of 240 epochs, of the form's 30

    page.select_option("#f-method", "dist")
    text = visible_help(page)
    assert "Huang et al., NeurIPS 2022" in text and "Knowledge Distillation from A Stronger Teacher" in text
    assert "Decoupled" not in text and "Logit Standardization" not in text
    assert not page.is_visible("#f-logit_standardization")  # refused for DIST by the config
    assert page.is_visible("#f-dist-gamma")

    page.fill("#f-hidden", "8")
    page.fill("#f-epochs", "6")
    page.select_option("#f-keep", "last")
    # The GPU path's settings live under Advanced and are sent only when changed.
    preview = json.loads(page.eval_on_selector("#config-preview", "e => e.textContent"))
    assert not {"precision", "channels_last", "compile"} & set(preview)
    page.click("#advanced summary")
    page.select_option("#f-precision", "fp32")
    page.check("#f-channels_last")
    preview = json.loads(page.eval_on_selector("#config-preview", "e => e.textContent"))
    assert preview["precision"] == "fp32" and preview["channels_last"] is True and "compile" not in preview
    assert preview["method"] == "dist" and preview["keep"] == "last"
    assert preview["method_options"] == {"beta": 1, "gamma": 1, "ce_weight": 1}
    assert "alpha" not in preview and "logit_standardization" not in preview
    page.click("#launch-btn")
    page.wait_for_url(re.compile(r".*/experiments/\d+/$"))
    page.wait_for_selector("#exp-status [data-status=succeeded]", timeout=120_000)
    page.wait_for_selector("#card-stats [data-metric=test_agreement]")
    agreement = page.inner_text("#card-stats [data-metric=test_agreement]")
    kl = page.inner_text("#card-stats [data-metric=test_kl_to_teacher]")
    assert "agrees with the teacher" in agreement and re.search(r"\d+(\.\d+)?\s*%", agreement), agreement
    assert "KL(teacher ‖ student)" in kl and re.search(r"\d", kl), kl
    # Run facts: what it computed in, and memory named for what it is (a CPU worker: the process's peak RSS).
    assert page.inner_text("#card-stats [data-metric=precision] .v") == "fp32"
    rss = page.inner_text("#card-stats [data-metric=process_peak_rss_mb]")
    assert "peak RSS" in rss and "not GPU memory" in rss and re.search(r"\d [MG]iB", rss), rss
    # channels_last on vector data: the run says it ignored it.
    notes = page.eval_on_selector_all("#card-notes-list li", "els => els.map(e => e.innerText)")
    assert page.is_visible("#card-notes") and any("channels_last" in n for n in notes), notes
    exp_id = int(re.search(r"/experiments/(\d+)/", page.url).group(1))
    config = api(stack.url, token, "GET", f"/api/experiments/{exp_id}/")["config"]
    assert config["precision"] == "fp32" and config["channels_last"] is True and config["compile"] is False
    # A clone refills them.
    page.goto(f"{stack.url}/experiments/new/?clone={exp_id}")
    page.wait_for_function("document.querySelector('#form-title').textContent === 'Clone and edit'")
    assert page.input_value("#f-precision") == "fp32" and page.is_checked("#f-channels_last")
    assert not page.is_checked("#f-compile")
    assert page.js_errors == []
