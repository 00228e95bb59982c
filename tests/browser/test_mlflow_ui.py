"""The MLflow UI over a real sweep's store, in headless Chromium (Debian's package) driven by Playwright: the link the
sweep prints opens its runs table in the model-training view; the parent run expands to its trials; the chart view
shows the objective; a figure the report logged opens in the artifact viewer.

Screenshots go to `test-output/browser/` at the repository root (and the test's temporary folder) for a person to
look at. `.ci/run` installs Chromium when it is missing.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from tests.service.test_end_to_end import SWEEP, cli, env
from tests.service.test_report import report_cli

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = REPO / "test-output" / "browser"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A sweep and its report in a temporary folder, and `mlflow server` on its store."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed (apt-get install chromium); .ci/run installs it")
    tmp = tmp_path_factory.mktemp("ui")
    (tmp / "space.yaml").write_text(SWEEP)
    sweep = cli(tmp, "--space", "space.yaml", timeout=600)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    report = report_cli(tmp)
    assert report.returncode == 0, report.stderr[-3000:]
    (link,) = re.findall(r"then open (http://127\.0\.0\.1:5000/\S+)", sweep.stdout)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2).read()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("mlflow server did not start")
            time.sleep(0.5)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield {
        "base": base,
        "link": link.replace("http://127.0.0.1:5000", base),
        "client": MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}"),
        "tmp": tmp,
    }
    import os
    import signal

    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def shot(page, server, name: str) -> None:
    close = page.get_by_label("Close")  # the UI's assistant panel, which covers a third of the page
    if close.count() and close.first.is_visible():
        close.first.click()
    for folder in (SHOTS, server["tmp"]):
        page.screenshot(path=str(folder / f"{name}.png"))


def search_name(server) -> str:
    return search(server["client"])[1].info.run_name


def search(client: MlflowClient) -> tuple:
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("ltssl.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return exp, parent, children


def test_the_printed_link_opens_the_sweeps_runs_table_in_model_training_mode(page, server):
    exp, parent, children = search(server["client"])
    page.goto(server["link"])
    table = page.locator("[role=grid]").first
    page.set_viewport_size({"width": 2400, "height": 1000})  # the grid draws only the columns in view
    # the table sorts every trial by its latest objective, a trial ASHA stopped early included (its early value may
    # top the finished ones'); ties may come in either order
    scored = [c for c in children if "val/balanced_acc" in c.data.metrics]
    top = max(c.data.metrics["val/balanced_acc"] for c in scored)
    leaders = {c.info.run_name for c in scored if c.data.metrics["val/balanced_acc"] == top}
    best = next(c for c in scored if c.info.run_name in leaders)
    page.get_by_text(best.info.run_name, exact=True).first.wait_for()
    # model training, not GenAI: the runs view of the experiment
    assert page.get_by_text("Model training").first.is_visible()
    assert f"#/experiments/{exp.experiment_id}/runs" in page.url
    # the sweep's view: its trials only, ranked by the objective, with the searched values and summary metrics
    assert page.get_by_test_id("sort-select-dropdown").inner_text().strip() == "Sort: val/balanced_acc"
    text = table.inner_text()
    for column in ("method.preset", "val/balanced_acc", "test/balanced_acc", "test/recall_tail"):
        assert column in text, column
    rows = page.eval_on_selector_all(
        "[role=row][row-index]",
        "rows => rows.map(r => [Number(r.getAttribute('row-index')), "
        "(r.querySelector('a[href*=\"/runs/\"]') || {}).textContent])",
    )
    names = [name for _, name in sorted(r for r in rows if r[1])]
    # the sweep's trials, the best first, and not the parent run (nor another sweep's runs)
    assert names[0] in leaders
    assert sorted(names) == sorted(c.info.run_name for c in children)
    shot(page, server, "1_runs_table")


def test_the_parent_run_expands_to_its_trials(page, server):
    exp, parent, children = search(server["client"])
    page.goto(f"{server['base']}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
    row = page.locator("[role=row]", has_text=parent.info.run_name).first
    row.wait_for()
    trial = children[0].info.run_name
    assert page.get_by_text(trial, exact=True).count() == 0  # collapsed
    row.locator("button[data-component-id$='runnamecellrenderer.tsx_46']").click()
    for child in children:
        page.get_by_text(child.info.run_name, exact=True).first.wait_for()
    shot(page, server, "2_parent_expanded")


def test_the_chart_view_shows_the_objective_for_the_trials(page, server):
    page.goto(server["link"])
    page.locator("input[value=CHART]").first.wait_for(state="attached")
    page.locator("label", has=page.locator("input[value=CHART]")).first.click()
    # the view's chart filter keeps the objective's charts: one line per trial, named in the legend
    exp, parent, children = search(server["client"])
    page.get_by_text(f"{children[0].info.run_name} (val/balanced_acc)").first.wait_for()
    page.locator("svg.main-svg").first.wait_for()  # a plotted chart
    shot(page, server, "3_chart_view")


def test_a_figure_opens_in_the_artifact_viewer(page, server):
    exp, parent, _ = search(server["client"])
    page.goto(f"{server['base']}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifacts")
    page.get_by_text("report", exact=True).first.click()
    page.get_by_text("figures", exact=True).first.click()
    page.get_by_text("per_class_recall.png", exact=True).first.click()
    # the viewer draws the file it fetched (a blob: image), at the PNG's own size
    expected = Image.open(server["tmp"] / "reports" / search_name(server) / "figures" / "per_class_recall.png").width
    page.wait_for_function(
        "w => [...document.images].some(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth === w)",
        arg=expected,
    )
    shot(page, server, "4_artifact_figure")
