"""What a reviewer sees of a pipeline run in MLflow's UI, read from pages that Chromium renders.

The store is the session's shortened tiny pipeline (``tiny_pipeline``); ``lens ui`` serves it.
Every check reads the rendered page (its text and its image elements), never the REST API;
each page's screenshot lands in the test's output folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, PipelineRuns, free_port

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no Chromium: apt-get install chromium chromium-driver (Debian's packages; "
           "no browser download works on these hosts)")


@pytest.fixture(scope="module")
def ui(tiny_pipeline: PipelineRuns, tmp_path_factory) -> Iterator[str]:
    """``lens ui`` on the session's store: the URL it prints, the newest pipeline run's page."""
    log = tmp_path_factory.mktemp("ui") / "lens-ui.log"
    port = free_port()
    # Output to a file: a pipe nobody reads fills up and stalls the server.
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "lens"), "ui", "--port", str(port)], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "MLflow UI:" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        line = next(x for x in log.read_text().splitlines() if "MLflow UI:" in x)
        assert "/#/experiments/" in line, f"lens ui named no pipeline run: {line}"
        yield line.split()[2]  # the newest pipeline run's page
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def browser(ui: str) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1920,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


class Page:
    """Opens UI pages and waits until they show what is asked (MLflow renders skeletons for
    a few seconds first), keeping a screenshot of each."""

    def __init__(self, driver, base: str, shots: Path) -> None:
        self.driver, self.base, self.shots = driver, base, shots
        shots.mkdir(parents=True, exist_ok=True)

    def open(self, name: str, route: str, *expected: str, search: str = "",
             timeout: float = 90) -> str:
        """The page's text once it shows every ``expected`` item; ``search`` goes into the
        page's search box first (the model-metrics page draws only the charts in view)."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        # A fresh document per page: moving between runs by the URL's hash alone, the UI can
        # keep the last run's artifact listing.
        self.driver.get("about:blank")
        self.driver.get(f"{self.base}/#/{route}")
        if search:
            box = WebDriverWait(self.driver, timeout).until(lambda d: d.find_element(
                By.CSS_SELECTOR, "input[placeholder^='Search']"))
            box.send_keys(search)
        text = ""

        def shown(driver) -> bool:
            nonlocal text
            text = driver.find_element(By.TAG_NAME, "body").text
            return all(item in text for item in expected)

        try:
            WebDriverWait(self.driver, timeout, poll_frequency=1).until(shown)
        except TimeoutException:
            missing = [item for item in expected if item not in text]
            pytest.fail(f"{name} ({route}) never showed {missing}; it showed:\n{text[:3000]}")
        finally:
            self.driver.save_screenshot(str(self.shots / f"{name}.png"))
        return text

    def images(self, timeout: float = 60) -> list[int]:
        """The natural widths of the page's images, once one has loaded."""
        from selenium.webdriver.support.ui import WebDriverWait

        script = "return [...document.images].map(i => i.complete ? i.naturalWidth : 0)"
        WebDriverWait(self.driver, timeout).until(
            lambda d: any(w > 0 for w in d.execute_script(script)))
        return self.driver.execute_script(script)


@pytest.fixture(scope="module")
def page(browser, ui: str, tmp_path_factory) -> Page:
    return Page(browser, ui.split("/#/")[0], tmp_path_factory.mktemp("screenshots"))


@pytest.fixture(scope="module")
def runs(tiny_pipeline: PipelineRuns) -> dict[str, str]:
    """Stage → run id, plus the experiment and both parent runs (navigation only)."""
    import mlflow

    first = tiny_pipeline.first
    exp = mlflow.MlflowClient().get_run(first["parent_run_id"]).info.experiment_id
    return {**first["runs"], "exp": exp,
            "parent": first["parent_run_id"], "again": tiny_pipeline.again["parent_run_id"]}


def test_lens_ui_opens_on_a_pipeline_run(page: Page, ui: str) -> None:
    page.open("lens-ui", ui.split("/#/")[1], "pipeline-tiny", "Child runs")


def test_parent_run_lists_a_child_run_per_stage(page: Page, runs: dict[str, str]) -> None:
    page.open("experiment", f"experiments/{runs['exp']}/runs", "pipeline-tiny")
    text = page.open("parent-run", f"experiments/{runs['exp']}/runs/{runs['parent']}",
                     "Child runs", "vae-tiny", "pretrain-tiny", "rl-tiny", "reasoner-tiny",
                     "reasoner-search-tiny", "distill-tiny", "evaluate-tiny", "register-tiny",
                     "eval/overall", "stage_seconds/pretrain", "pretrain.steps",
                     "Lens pipeline")
    assert "lens.dvc_hash" in text


def test_compare_view_lines_up_two_pipeline_runs(page: Page, runs: dict[str, str]) -> None:
    route = (f'compare-runs?runs=["{runs["parent"]}","{runs["again"]}"]'
             f'&experiments=["{runs["exp"]}"]')
    # The metrics table draws only the rows in view: the first, alphabetically, are baseline/*.
    text = page.open("compare", route, "Comparing 2 Runs", "Metrics", "baseline/overall",
                     "baseline/counting", "pretrain.steps")
    assert text.count("pipeline-tiny") >= 2


def test_stage_runs_show_learning_curves(page: Page, runs: dict[str, str]) -> None:
    exp = runs["exp"]
    for stage, curves in (("pretrain", ("train/loss",)), ("rl", ("rl/reward", "gold/reward"))):
        text = page.open(f"{stage}-curves", f"experiments/{exp}/runs/{runs[stage]}/model-metrics",
                         *curves, search=curves[0].rsplit("/", 1)[-1])
        assert "Step" in text  # drawn as a history over steps, not a single value


@pytest.mark.parametrize(("stage", "artifact"), [
    ("vae", "vae/reconstructions.png"), ("pretrain", "samples/step-00000006.png"),
    ("rl", "samples/gold-step-00000002.png"), ("distill", "samples/turbo-step-00000000.png"),
    ("evaluate", "eval/grid.png")])
def test_grids_render_as_images(page: Page, runs: dict[str, str], stage: str,
                                artifact: str) -> None:
    page.open(f"{stage}-artifact", f"experiments/{runs['exp']}/runs/{runs[stage]}/artifacts/"
              f"{artifact}", artifact.rsplit("/", 1)[-1])
    assert max(page.images()) > 0


def test_registered_version_shows_aliases_card_and_lineage(
        page: Page, tiny_pipeline: PipelineRuns) -> None:
    out = tiny_pipeline.first
    page.open("model-version", f"models/{out['model']}/versions/{out['version']}",
              "champion", "candidate", "Lens tiny recipe", "Lineage", "lens.dvc_hash",
              out["dvc_hash"], "lens.run.pretrain", "lens.git_commit")
