"""The new-experiment form offers torchvision/timm models: searched by name, sized and timed at the dataset's shape."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kd_core.models.library import available
from tests.browser.helpers import upload

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not available("torchvision"), reason="torchvision does not import here (torch 2.13)"),
]


def test_pick_a_library_student_by_name(page, stack, token, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "img.npz", x=rng.random((30, 3, 32, 32), dtype=np.float32), y=np.arange(30) % 3)
    ds = upload(stack.url, token, "/api/datasets/", {"name": "img32"}, tmp_path / "img.npz")
    page.goto(stack.url + "/experiments/new/")
    page.select_option("#f-kind", "train")
    page.select_option("#f-dataset", str(ds["id"]))
    page.select_option("#f-arch", "library")
    page.fill("#f-libname", "resnet1")
    page.wait_for_function("document.querySelectorAll('#lib-names option').length > 0", timeout=30_000)
    options = page.eval_on_selector_all("#lib-names option", "els => els.map(e => e.value)")
    assert "torchvision/resnet18" in options
    page.fill("#f-libname", "torchvision/resnet18")
    page.dispatch_event("#f-libname", "change")
    page.wait_for_function(
        "document.querySelector('#lib-help').textContent.includes('ms per sample')", timeout=60_000
    )
    assert int(page.get_attribute("#student-params", "data-params")) == 11_178_051  # 3 classes
    preview = json.loads(
        page.eval_on_selector("#config-preview", "e => e.textContent")
    )  # inside a closed <details>
    assert preview["model"] == {"arch": "torchvision", "name": "resnet18", "kwargs": {}}
    assert page.js_errors == []
