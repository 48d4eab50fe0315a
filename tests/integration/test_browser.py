"""Looking at a run as a user does (issues 6 and 24): after a small demo run, a real `mlflow
server` on 127.0.0.1 serves the run's store; headless Chromium (Debian's `chromium`, driven by
Playwright, no browser download) opens the experiment on its runs (not GenAI's overview) at the
address the summary prints, sees the parent run's description and its member runs, opens a
clone's `fitness` chart (a line from the first generation: its ancestors' points are in its
run), shows the three pictures of the parent run, and saves screenshots under tests/artifacts/.

Needs /usr/bin/chromium (`apt-get install -y chromium`) and the `playwright` package (the
`test` extra); `make test` installs both. Never skipped: a missing browser is a failure.
"""
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.browser import assert_real_screenshot, browser_page, fresh_screenshots
from tests.helpers.paths import BIN, DEMO, REPO
from tests.helpers.processes import free_port, subprocess_env


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("browser") / "demo-run"
    sets = ["population.backend=local", "data.num_rows=160", "evolution.generations=3",
            "evolution.steps_per_generation=2"]
    result = subprocess.run([str(BIN / "evo-sft"), "run", str(DEMO), "--run-dir", str(run_dir),
                             *[x for s in sets for x in ("--set", s)]],
                            capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def mlflow_server(demo_run):
    """`mlflow server` over the run's sqlite store; stopped by its PID (its own process group)."""
    port = free_port()
    log = (demo_run.parent / "mlflow-server.log").open("wb")
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{demo_run / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=subprocess_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), cwd=demo_run.parent,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, (demo_run.parent / "mlflow-server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        yield url
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if process.poll() is None:
                os.killpg(process.pid, sig)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        log.close()


def _member_runs(run_dir: Path) -> tuple:
    """(experiment id, parent run, {member run name: run}) from the store, to know what the page must show."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("demo")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("evo_sft.role") == "evolution")
    members = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return experiment.experiment_id, parent, members


def test_mlflow_ui_shows_the_evolution_a_continuous_member_chart_and_the_pictures(demo_run, mlflow_server):
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import expect

    from evo_sft.tracking import mlflow_runs_page

    experiment_id, parent, members = _member_runs(demo_run)
    parent_name = parent.info.run_name
    assert len(members) >= 4
    # a clone born in the last generation: its run holds a fitness point for every generation
    clone = max((run for run in members.values() if run.data.tags["evo_sft.parent_member_id"]),
                key=lambda run: int(run.data.tags["evo_sft.generation_born"]))
    assert clone.data.tags["evo_sft.generation_born"] == "3"
    history = MlflowClient(f"sqlite:///{demo_run / 'mlflow.db'}").get_metric_history(clone.info.run_id, "fitness")
    assert sorted(point.step for point in history) == [2, 4, 6]
    names = ("fitness_curves.png", "family_tree.png", "schedule.png")
    runs_png, chart_png, *shown = fresh_screenshots("mlflow_experiment_runs.png", "mlflow_member_fitness.png",
                                                    *(f"mlflow_{name}" for name in names))
    pictures = dict(zip(names, shown))

    with browser_page() as page:
        # the page the summary names opens on the runs, the parent run first
        page.goto(mlflow_runs_page(mlflow_server, experiment_id))
        parent_link = page.get_by_role("link", name=parent_name, exact=True)
        expect(parent_link).to_be_visible()
        parent_cell = page.locator('[col-id="attributes.`Run Name`"]').filter(has=parent_link)
        parent_cell.get_by_role("button").first.click()  # the row's expand toggle: its member runs
        for name in members:
            expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
        page.screenshot(path=str(runs_png), full_page=True)

        # the parent run's page: its description, and its pictures among the artifacts
        parent_link.click()
        expect(page.get_by_text("An evo-sft evolution.").first).to_be_visible()
        page.goto(f"{mlflow_server}/#/experiments/{experiment_id}/runs/{parent.info.run_id}/artifacts")
        for name, png in pictures.items():
            page.get_by_text(name, exact=True).first.click()  # in the artifact tree
            image = page.get_by_role("img", name=name, exact=True)
            expect(image).to_be_visible()
            page.wait_for_function("image => image.complete && image.naturalWidth > 600", arg=image.element_handle())
            page.screenshot(path=str(png), full_page=True)

        # the clone's run page -> its `fitness` metric -> a chart over all three generations
        page.goto(f"{mlflow_server}/#/experiments/{experiment_id}/runs/{clone.info.run_id}")
        expect(page.get_by_text("Parent run", exact=True).first).to_be_visible()
        page.get_by_role("link", name="fitness", exact=True).click()
        page.get_by_placeholder("Search metric charts").fill("fitness")
        expect(page.get_by_text(f"{clone.info.run_name} (fitness)", exact=True).first).to_be_visible()
        chart = page.locator(".js-plotly-plot").first
        expect(chart).to_be_visible()
        assert page.get_by_text("train_loss", exact=True).count() == 0, "the chart search did not filter"
        # a line through its points (from generation 1: its ancestors'), not a lone dot
        expect(chart.locator(".scatterlayer .trace path.js-line").first).to_have_attribute("d", re.compile(r"^M[^M]+L"))
        page.wait_for_timeout(1000)  # let the plot finish its transition
        page.screenshot(path=str(chart_png), full_page=True)

    for png in (runs_png, chart_png, *pictures.values()):
        assert_real_screenshot(png)
