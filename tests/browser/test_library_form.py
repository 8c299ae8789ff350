"""torchvision/timm models in the browser: a library student picked by name on the new-experiment form (sized and
timed at the dataset's shape), and a plain torchvision state dict uploaded as a teacher with its ImageNet preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kd_core.models.library import available
from tests.browser.helpers import api, upload

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


IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.mark.timeout(600)  # a 45 MB upload, inspected in the request, on a shared two-core box
def test_upload_a_torchvision_state_dict_with_imagenet_preprocessing(page, stack, token, tmp_path):
    import torch
    import torchvision

    rng = np.random.default_rng(1)
    np.savez(tmp_path / "img.npz", x=rng.random((30, 3, 32, 32), dtype=np.float32), y=np.arange(30) % 3)
    ds = upload(stack.url, token, "/api/datasets/", {"name": "img32-teacher"}, tmp_path / "img.npz")
    spec = {"arch": "torchvision", "name": "resnet18", "kwargs": {}}

    page.goto(stack.url + "/teachers/")
    assert page.is_hidden("#pre-field")
    assert "Input normalisation" in page.inner_text("#teacher-contract")  # where the contract speaks of it
    # Refused on the server, shown next to the spec: a library name torchvision does not have.
    small = tmp_path / "small.pt"
    torch.save(torchvision.models.squeezenet1_1(num_classes=3).state_dict(), small)
    page.set_input_files("#ck-file", str(small))
    assert page.is_visible("#pre-field") and page.input_value("#ck-pre") == ""
    page.fill("#ck-arch", '{"arch": "torchvision"}')
    assert "name" in page.inner_text("#arch-err")  # checked as typed
    page.fill("#ck-arch", '{"arch": "torchvision", "name": "squeezenet9_9"}')
    assert page.inner_text("#arch-err") == ""
    page.click("#upload-btn")
    page.wait_for_selector("#upload-error")
    assert "squeezenet9_9" in page.inner_text("#arch-err")

    pt = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), pt)
    page.set_input_files("#ck-file", str(pt))
    assert page.inner_text("#ck-format") == "state dict"
    page.fill("#ck-arch", json.dumps(spec))
    page.select_option("#ck-dataset", str(ds["id"]))
    # Custom values are checked as the server checks them; the label names the field for screen readers.
    page.select_option("#ck-pre", "custom")
    assert page.is_visible("#ck-pre-mean") and page.is_visible("label[for=ck-pre-std]")
    page.fill("#ck-pre-mean", "0.5, 0.5")
    page.fill("#ck-pre-std", "0.2, 0, 0.2")
    assert "3 channels" in page.inner_text("#pre-err")  # the chosen dataset's images are RGB
    page.fill("#ck-pre-mean", "0.5")
    assert "positive" in page.inner_text("#pre-err")
    assert page.get_attribute("#ck-pre-std", "aria-invalid") == "true"
    page.click("#upload-btn")  # refused in the page: nothing is sent
    assert page.inner_text("#upload-msg") == ""
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.set_viewport_size({"width": 1280, "height": 900})

    page.select_option("#ck-pre", "imagenet")
    assert page.is_hidden("#ck-pre-mean") and page.inner_text("#pre-err") == ""
    page.click("#upload-btn")
    page.wait_for_function("document.querySelector('#found h3')?.textContent === 'resnet18'", timeout=420_000)
    assert "is ready" in page.inner_text("#upload-msg")
    assert "11.18M" in page.inner_text("#ck-stats")  # 11,178,051 with 3 classes (checked below)
    assert "(3 × 32 × 32)" in page.inner_text("#ck-stats")
    shown = page.inner_text("#ck-pre-shown")
    assert "ImageNet" in shown and "0.485, 0.456, 0.406" in shown and "0.229, 0.224, 0.225" in shown
    assert json.loads(page.inner_text("#found pre")) == spec
    assert page.is_hidden("#pre-field")  # the form is reset for the next upload

    listed = api(stack.url, token, "GET", "/api/checkpoints/")["checkpoints"]
    (ck,) = [c for c in listed if c["name"] == "resnet18"]
    row = page.locator(f"#ck-table tr[data-id='{ck['id']}']")
    row.wait_for()
    assert "torchvision/resnet18" in row.inner_text() and "normalised inputs" in row.inner_text()
    assert row.locator("a.btn", has_text="Distill").is_visible()  # ready to distil
    assert ck["status"] == "ready" and ck["format"] == "state_dict"
    assert ck["preprocessing"] == IMAGENET and ck["arch"] == spec
    assert ck["num_params"] == 11_178_051 and ck["num_classes"] == 3 and ck["dataset"] == ds["id"]
    assert [e for e in page.js_errors if "status of 400" not in e] == []
