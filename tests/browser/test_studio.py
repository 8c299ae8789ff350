"""The dashboard in a real Chromium against a real stack: upload, launch, watch live, cancel, compare, download."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

from tests.browser.conftest import DESKTOP, PHONE, USERNAME, login
from tests.browser.helpers import CLASSES, FEATURES, api, make_npz, make_teacher, upload

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def world(stack, token, tmp_path_factory):
    """A dataset and a teacher uploaded through the API, for tests about other pages."""
    d = tmp_path_factory.mktemp("world")
    npz = make_npz(d / "blobs.npz")
    teacher = make_teacher(d, npz)
    ds = upload(stack.url, token, "/api/datasets/", {"name": "blobs"}, npz)
    ck = upload(stack.url, token, "/api/checkpoints/", {"name": "blob-teacher"}, teacher)
    return {"dir": d, "npz": npz, "teacher": teacher, "dataset": ds, "checkpoint": ck}


def no_js_errors(page, allow: str | None = None) -> None:
    """No script errors and no failed requests, except those matching `allow` (an expected refusal)."""
    errors = [e for e in page.js_errors if not (allow and re.search(allow, e))]
    assert errors == [], f"JavaScript errors on {page.url}: {errors}"


def wait_status(stack, token, exp_id: int, statuses: tuple[str, ...], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        e = api(stack.url, token, "GET", f"/api/experiments/{exp_id}/")
        if e["status"] in statuses:
            return e
        time.sleep(0.3)
    raise AssertionError(f"experiment {exp_id} still {e['status']} after {timeout}s: {e.get('error')}")


def test_login_logout_and_header(browser, stack, token):
    ctx = browser.new_context(viewport=DESKTOP)
    page = ctx.new_page()
    try:
        page.goto(stack.url + "/datasets/")
        assert "/login/" in page.url  # pages need a session
        page.fill("#id_username", USERNAME)
        page.fill("#id_password", "wrong-password")
        page.click("#login-btn")
        assert "didn't match" in page.inner_text(".alert.error")
        login(page, stack.url)
        assert page.inner_text("#username") == USERNAME
        page.wait_for_function("/^\\d+$/.test(document.querySelector('#jobs-running').textContent)")
        assert re.fullmatch(r"\d+", page.inner_text("#jobs-queued"))
        page.click("text=Log out")
        page.wait_for_url(re.compile(r".*/login/"))
        page.goto(stack.url + "/experiments/")
        assert "/login/" in page.url
    finally:
        ctx.close()


def test_dataset_upload_shows_inspection_or_refusal(page, stack, tmp_path):
    npz = make_npz(tmp_path / "upload-me.npz", n=300, seed=1)
    page.goto(stack.url + "/datasets/")
    page.set_input_files("#ds-file", str(npz))
    page.click("#upload-btn")
    # The panel may still show the dataset that was selected before; the upload's answer replaces it.
    page.wait_for_selector("#ds-stats:has-text('300')")
    stats = page.inner_text("#ds-stats")
    assert "300" in stats and "(16)" in stats
    assert page.locator("#class-balance .bar").count() == CLASSES
    assert page.locator("#first-rows tbody tr").count() > 0
    assert page.locator("#ds-table tbody tr", has_text="upload-me").count() == 1

    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"this is not a zip archive at all")
    page.set_input_files("#ds-file", str(bad))
    page.click("#upload-btn")
    err = page.wait_for_selector("#upload-error").inner_text()
    assert err.startswith("Refused:") and len(err) > 15, err
    no_js_errors(page, allow="status of 400")


def test_teacher_upload_safetensors_and_state_dict(page, stack, world, tmp_path):
    import torch

    from kd_core.models import build_model, count_params

    page.goto(stack.url + "/teachers/")
    page.set_input_files("#ck-file", str(world["teacher"]))
    assert page.inner_text("#ck-format") == "safetensors"
    page.click("#upload-btn")
    page.wait_for_selector("#ck-stats")
    assert f"{world['checkpoint']['num_params']:,}" in page.inner_text("#ck-stats")

    # A bare state dict needs its architecture: the spec editor appears for .pt files.
    model = build_model({"arch": "mlp", "hidden": [24]}, (FEATURES,), CLASSES)
    pt = tmp_path / "bare.pt"
    torch.save(model.state_dict(), pt)
    page.set_input_files("#ck-file", str(pt))
    assert page.is_visible("#ck-arch")
    page.fill("#ck-arch", '{"arch": "mlp", "hidden": [24]}')
    page.select_option("#ck-dataset", str(world["dataset"]["id"]))
    page.click("#upload-btn")
    page.wait_for_function("document.querySelector('#found h3')?.textContent === 'bare'")
    assert f"{count_params(model):,}" in page.inner_text("#ck-stats")
    assert "(16)" in page.inner_text("#ck-stats")
    no_js_errors(page)


def test_param_count_in_browser_matches_engine(page, stack):
    from kd_core.models import build_model, count_params

    cases = [
        ({"arch": "mlp", "hidden": [16]}, [16], 3),
        ({"arch": "mlp", "hidden": [64, 32], "dropout": 0.1}, [3, 8, 8], 10),
        ({"arch": "cnn", "channels": [8, 16]}, [3, 16, 16], 10),
        ({"arch": "cnn", "channels": [8, 16], "hidden": [32]}, [1, 28, 28], 10),
        ({"arch": "resnet", "depth": 8, "width": 1}, [3, 32, 32], 10),
        ({"arch": "resnet", "depth": 14, "width": 2}, [3, 32, 32], 100),
    ]
    page.goto(stack.url + "/experiments/new/")
    got = page.evaluate(
        """async (cases) => { const m = await import('/static/kd/params.js');
           return cases.map(([s, shape, n]) => m.paramCount(s, shape, n)); }""",
        cases,
    )
    want = [count_params(build_model(s, tuple(shape), n)) for s, shape, n in cases]
    assert got == want


def test_distill_from_form_live_chart_and_download(page, stack, token, world, tmp_path):
    import onnxruntime as ort

    from kd_core.models import build_model, count_params

    ds, ck = world["dataset"], world["checkpoint"]
    page.goto(stack.url + "/experiments/new/")
    page.select_option("#f-kind", "distill")
    page.select_option("#f-dataset", str(ds["id"]))
    page.select_option("#f-teacher", str(ck["id"]))
    page.fill("#f-name", "live-kd")
    page.fill("#f-hidden", "16")
    page.fill("#f-epochs", "120")
    page.fill("#f-batch_size", "16")
    page.click("#advanced summary")
    page.fill("#f-log_every", "4")
    expected = count_params(build_model({"arch": "mlp", "hidden": [16]}, (FEATURES,), CLASSES))
    assert int(page.get_attribute("#student-params", "data-params")) == expected
    assert "smaller than the teacher" in page.inner_text("#size-ratio")
    page.click("#launch-btn")
    page.wait_for_url(re.compile(r".*/experiments/\d+/$"))
    exp_id = int(page.url.rstrip("/").rsplit("/", 1)[1])
    # Record every status and progress the page shows, to check they move without a reload.
    page.evaluate(
        """() => { window.__sameDocument = true; window.__seen = [];
        const note = () => window.__seen.push([document.querySelector('#exp').dataset.status,
            Number(document.querySelector('#progress-text').dataset.progress)]);
        note();
        new MutationObserver(note).observe(document.querySelector('#exp'), {attributes: true, subtree: true}); }"""
    )

    # Points arrive while the job runs, with no reload (the marker survives).
    page.wait_for_function("Number(document.querySelector('#charts').dataset.points) > 0", timeout=60_000)
    first = int(page.get_attribute("#charts", "data-points"))
    # Drop the socket: the page reconnects and refetches what it missed (checked by the total below).
    page.evaluate("window.kdLive.socket().close()")
    page.wait_for_function("document.querySelector('#live').textContent.includes('reconnecting')")
    page.wait_for_function("document.querySelector('#live').textContent.includes('live')", timeout=30_000)
    page.wait_for_function(
        f"Number(document.querySelector('#charts').dataset.points) > {first}", timeout=60_000
    )
    page.wait_for_selector("#exp-status [data-status=succeeded]", timeout=120_000)
    assert page.evaluate("window.__sameDocument === true")
    seen = page.evaluate("window.__seen")
    assert any(st == "running" and 0 < p < 1 for st, p in seen), seen[-20:]
    assert seen[-1] == ["succeeded", 1]
    # The card is drawn from the finished experiment, fetched once the final status arrives.
    page.wait_for_selector("#model-card:not(.hidden)", timeout=10_000)
    assert "%" in page.inner_text("[data-metric=test_acc]")
    assert page.locator(".chart[data-chart=loss]").count() == 1
    assert page.locator(".chart[data-chart=accuracy]").count() == 1

    # History + live messages, deduplicated by (series, step), equal what the database holds.
    series = api(stack.url, token, "GET", f"/api/experiments/{exp_id}/metrics/")["series"]
    total = sum(len(v) for v in series.values())
    page.wait_for_function(f"Number(document.querySelector('#charts').dataset.points) === {total}")

    with page.expect_download() as dl:
        page.click("#downloads a[data-format=onnx]")
    path = tmp_path / "student.onnx"
    dl.value.save_as(path)
    with np.load(world["npz"]) as d:
        x, y = d["x"], d["y"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"input": x})
    assert logits.shape == (len(x), CLASSES)
    assert (logits.argmax(1) == y).mean() > 0.8
    no_js_errors(page)


def test_codistill_from_form_shows_replicas(page, stack, token, world, tmp_path):
    from safetensors import safe_open

    page.goto(stack.url + "/experiments/new/")
    page.select_option("#f-kind", "codistill")
    assert page.is_hidden("#teacher-field") and page.is_visible("#codistill-block")
    # The weight-decay advice shows only once weight decay is set (issue 14).
    assert page.is_hidden("#wd-note")
    page.fill("#f-weight_decay", "0.001")
    assert "over-regularise" in page.inner_text("#wd-note")
    page.fill("#f-weight_decay", "0")
    page.select_option("#f-dataset", str(world["dataset"]["id"]))
    page.fill("#f-name", "codist-ui")
    page.fill("#f-hidden", "8")
    page.fill("#f-epochs", "6")
    page.fill("#c-replicas", "2")
    page.fill("#c-burn_in_steps", "10")
    page.fill("#c-exchange_every", "5")
    page.click("#launch-btn")
    page.wait_for_url(re.compile(r".*/experiments/\d+/$"))
    page.wait_for_selector("#exp-status [data-status=succeeded]", timeout=120_000)
    page.wait_for_selector(".chart[data-chart=churn]")
    legend = page.inner_text(".chart[data-chart=accuracy]")
    assert "replica0/val/acc" in legend and "replica1/val/acc" in legend and "ensemble/val/acc" in legend
    assert page.locator("[data-metric=ensemble_test_acc]").count() == 1
    page.select_option("#replica", "1")
    with page.expect_download() as dl:
        page.click("#downloads a[data-format=safetensors]")
    assert "replica1" in dl.value.suggested_filename
    path = tmp_path / "replica1.safetensors"
    dl.value.save_as(path)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["spec"]
    no_js_errors(page)


def test_cancel_a_job_from_its_page(page, stack, token, world):
    created = api(stack.url, token, "POST", "/api/experiments/", {
        "kind": "train", "name": "to-cancel", "dataset": world["dataset"]["id"], "epochs": 5000,
        "batch_size": 8, "model": {"arch": "mlp", "hidden": [8]},
    })  # fmt: skip
    page.goto(f"{stack.url}/experiments/{created['id']}/")
    page.wait_for_selector("#cancel-btn:not(.hidden)")
    # Stopping asks first (issue 14): dismissing the question leaves the job alone.
    page.once("dialog", lambda d: d.dismiss())
    page.click("#cancel-btn")
    assert api(stack.url, token, "GET", f"/api/experiments/{created['id']}/")["status"] in (
        "queued",
        "running",
    )
    dialogs = []
    page.once("dialog", lambda d: (dialogs.append(d.message), d.accept()))
    page.click("#cancel-btn")
    page.wait_for_selector("#exp-status [data-status=cancelled]", timeout=60_000)
    assert wait_status(stack, token, created["id"], ("cancelled",))["status"] == "cancelled"
    assert page.is_hidden("#cancel-btn")
    assert "“to-cancel”" in dialogs[0] and "cannot be resumed" in dialogs[0]
    # The note says what became of the run and how to run it again.
    assert "clone" in page.wait_for_selector("#cancelled-note").inner_text().lower()
    no_js_errors(page)


def test_sweep_then_compare(page, stack, token, world):
    page.goto(stack.url + "/experiments/new/")
    page.select_option("#f-kind", "distill")
    page.select_option("#f-dataset", str(world["dataset"]["id"]))
    page.select_option("#f-teacher", str(world["checkpoint"]["id"]))
    page.fill("#f-name", "sweep")
    page.fill("#f-hidden", "8")
    page.fill("#f-epochs", "4")
    page.fill("#f-sweep-t", "2, 8")
    assert page.inner_text("#launch-btn") == "Launch 2 experiments"
    page.click("#launch-btn")
    page.wait_for_url(re.compile(r".*/compare/\?ids=\d+,\d+$"))
    ids = [int(i) for i in page.url.split("ids=")[1].split(",")]
    for i in ids:
        wait_status(stack, token, i, ("succeeded",))
    page.reload()
    page.wait_for_function("Number(document.querySelector('#charts').dataset.points) > 0")
    assert page.locator("#final-table tbody tr").count() == 2
    # Legends and heads name the runs by their (distinct) names, never by ids; titles are words (issue 14).
    legend = page.inner_text(".chart[data-chart='val/acc'] .u-legend")
    assert "sweep [temperature=2]" in legend and "sweep [temperature=8]" in legend
    assert "Validation accuracy" in page.inner_text(".chart[data-chart='val/acc']")
    heads = page.inner_text("#config-table thead")
    assert "sweep [temperature=2]" in heads and "#" not in heads.replace("sweep", "")
    # Sortable by keyboard: Enter on a focused head sorts, and the head says which way.
    page.focus("#final-table th[data-key=test_acc]")
    page.keyboard.press("Enter")
    assert page.get_attribute("#final-table th[data-key=test_acc]", "aria-sort") in (
        "ascending",
        "descending",
    )
    # Differences only: the temperature differs, the batch size does not.
    assert page.locator("#config-table tr[data-key=temperature]").count() == 1
    assert page.locator("#config-table tr[data-key=batch_size]").count() == 0
    page.uncheck("#diff-only")
    assert page.locator("#config-table tr[data-key=batch_size]").count() == 1
    page.click("#final-table th[data-key=name]")
    first = page.inner_text("#final-table tbody tr:first-child td:first-child")
    page.click("#final-table th[data-key=name]")
    assert page.inner_text("#final-table tbody tr:first-child td:first-child") != first
    page.fill("#smooth", "0.9")
    page.dispatch_event("#smooth", "input")
    page.click("#xaxis button[data-v=epoch]")
    page.click("#xaxis button[data-v=time]")
    page.click("#yaxis button[data-v=log]")
    assert int(page.get_attribute("#charts", "data-points")) > 0
    with page.expect_download() as dl:
        page.click("#csv-btn")
    text = Path(dl.value.path()).read_text()
    assert text.startswith("experiment_id,")
    assert {int(line.split(",")[0]) for line in text.splitlines()[1:]} == set(ids)

    # The list page selects experiments for the same comparison.
    page.goto(stack.url + "/experiments/")
    for i in ids:
        page.check(f"#exp-table tr[data-id='{i}'] input.pick")
    page.click("#compare-btn")
    page.wait_for_url(re.compile(r".*/compare/\?ids=.*"))
    assert sorted(int(i) for i in page.url.split("ids=")[1].split(",")) == sorted(ids)

    # Filters: from the URL, and from the selects.
    statuses = "rows => rows.filter(r => r.dataset.id).map(r => r.dataset.status)"
    page.goto(stack.url + "/experiments/?status=succeeded")
    page.wait_for_selector("#exp-table tbody tr[data-id]")
    assert set(page.eval_on_selector_all("#exp-table tbody tr", statuses)) == {"succeeded"}
    page.select_option("#flt-status", "queued")
    assert "queued" in page.url
    assert set(page.eval_on_selector_all("#exp-table tbody tr", statuses)) <= {"queued"}

    # Clone and edit pre-fills the form from an experiment's config.
    page.goto(f"{stack.url}/experiments/new/?clone={ids[1]}")
    page.wait_for_function("document.querySelector('#f-name').value.endsWith('-copy')")
    assert page.input_value("#f-temperature") == "8"
    assert page.input_value("#f-hidden") == "8"
    no_js_errors(page)


def test_charts_draw_100k_points_per_series(page, stack):
    """Three 100k-point series go through the live store and one uPlot panel (timing printed, not asserted)."""
    page.goto(stack.url + "/experiments/new/")
    out = page.evaluate(
        """async () => {
        const { SeriesStore, ChartPanel, align } = await import('/static/kd/charts.js');
        const store = new SeriesStore();
        const host = document.createElement('div'); host.style.width = '600px'; document.body.append(host);
        let t = performance.now();
        for (let s = 1; s <= 100000; s++) store.addMessage({type: 'metric', step: s,
            values: {'train/loss': 1 / s, 'train/loss_hard': 2 / s, 'train/loss_soft': 3 / s}});
        store.addMessage({type: 'metric', step: 5, values: {'train/loss': 0.2}});  // a duplicate
        const ingest = performance.now() - t;
        const names = store.names();
        const data = () => align(names.map((n) => ({xs: store.get(n).steps, ys: store.get(n).values})));
        t = performance.now();
        const panel = new ChartPanel(host, {key: 'perf', title: 'perf'});
        panel.update(names, data());
        // uPlot paints in a microtask: wait for a frame so the timing includes the drawing.
        const frame = () => new Promise((r) => requestAnimationFrame(() => r()));
        await frame();
        const first = performance.now() - t;
        t = performance.now();
        store.addMessage({type: 'metric', step: 100001,
            values: {'train/loss': 0.1, 'train/loss_hard': 0.1, 'train/loss_soft': 0.1}});
        panel.update(names, data());
        await frame();
        const again = performance.now() - t;
        // A zoomed chart keeps its x range while points arrive; an unzoomed one follows the data.
        const unzoomedMax = panel.plot.scales.x.max;
        panel.plot.setScale('x', {min: 1000, max: 2000});
        await frame();
        store.addMessage({type: 'metric', step: 100002,
            values: {'train/loss': 0.1, 'train/loss_hard': 0.1, 'train/loss_soft': 0.1}});
        panel.update(names, data());
        await frame();
        const zoom = [panel.plot.scales.x.min, panel.plot.scales.x.max, unzoomedMax];
        panel.plot.over.dispatchEvent(new MouseEvent('dblclick', {bubbles: true}));  // reset, as a user would
        await frame();
        zoom.push(panel.plot.scales.x.max, panel.root.dataset.zoomed);
        return {count: store.count(), drawn: Number(panel.root.dataset.points), ingest, first, again, zoom};
    }"""
    )
    print(
        f"100k x 3 series: ingest {out['ingest']:.0f} ms, first draw {out['first']:.0f} ms, redraw {out['again']:.0f} ms"
    )
    assert out["count"] == 300_003 + 3
    assert out["drawn"] == 300_003 + 3
    assert out["zoom"] == [1000, 2000, 100001, 100002, "0"]
    no_js_errors(page)


PAGES = ["/experiments/", "/experiments/new/", "/datasets/", "/teachers/", "/compare/"]


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280x800", "390x844"])
def test_pages_fit_the_screen(browser, stack, token, auth_state, world, shots_dir, viewport):
    ctx = browser.new_context(viewport=viewport, storage_state=auth_state)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        done = api(stack.url, token, "GET", "/api/experiments/?status=succeeded")["experiments"]
        pages = PAGES + [f"/experiments/{e['id']}/" for e in done[:1]]
        if len(done) >= 2:
            pages.append(f"/compare/?ids={done[0]['id']},{done[1]['id']}")
        for path in pages:
            page.goto(stack.url + path)
            page.wait_for_load_state("networkidle")
            name = re.sub(r"[^a-z0-9]+", "-", path.strip("/")) or "home"
            page.screenshot(path=str(shots_dir / f"{name}-{viewport['width']}.png"), full_page=True)
            # Nothing wider than the screen: no sideways scrolling of the page itself.
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= viewport["width"], f"{path} is {width}px wide on a {viewport['width']}px screen"
        page.goto(stack.url + "/login/")
        assert errors == []
    finally:
        ctx.close()
