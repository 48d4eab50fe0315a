"""Looking at a run as a user does (issues 6, 24 and 30): after the shared small demo run
(tests/helpers/demo_runs.py), `evo-sft ui RUN`
serves the run's store (a real `mlflow server` on 127.0.0.1) and prints its addresses; headless
Chromium (Debian's `chromium`, driven by Playwright, no browser download) opens the experiment on
its runs (not GenAI's overview) at the address it prints, the parent run already showing its
member runs, sees the parent run's description and follows its link to the artifacts, shows the
three pictures of the parent run, opens a clone's `fitness` chart (a line from the first
generation: its ancestors' points are in its run) and follows its description's link to its parent
member; Ctrl-C then stops the UI. Screenshots are saved under tests/artifacts/.

Needs /usr/bin/chromium (`apt-get install -y chromium`) and the `playwright` package (the
`test` extra); `make test` installs both. Never skipped: a missing browser is a failure.
"""
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.helpers.browser import assert_real_screenshot, browser_page, fresh_screenshots
from tests.helpers.demo_runs import GENERATIONS
from tests.helpers.paths import EVO_SFT
from tests.helpers.processes import path_without_the_venv, subprocess_env

MODEL_TRAINING = "?workflowType=machine_learning"


@pytest.fixture(scope="module")
def demo_run(demo_runs) -> tuple[Path, list[str]]:
    """The shared 4-generation demo run, and the command its summary prints to look at it in MLflow
    (it ran with the venv not active)."""
    run_dir = demo_runs.full
    line = next(line for line in demo_runs.full_run.stdout.splitlines() if line.startswith("MLflow UI:"))
    assert line == f"MLflow UI:       {EVO_SFT} ui {run_dir}  (serves this run's store, prints its address)"
    return run_dir, line.split()[2:5]


def _closed(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _follow(page, name: str, address: str):
    """Click the link `name` of a run's description (MLflow opens it in a new tab); the new tab, at `address`."""
    from playwright.sync_api import expect

    with page.expect_popup() as opened:
        page.get_by_role("link", name=name, exact=True).click()
    tab = opened.value
    expect(tab).to_have_url(re.compile(address))
    return tab


def _member_runs(run_dir: Path) -> tuple:
    """(experiment id, parent run, {member run name: run}) from the store, to know what the page must show."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("demo")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("evo_sft.role") == "evolution")
    members = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return experiment.experiment_id, parent, members


def test_mlflow_ui_shows_the_evolution_a_continuous_member_chart_and_the_pictures(demo_run):
    """`evo-sft ui RUN` started as the summary prints it, the venv not active."""
    from mlflow.tracking import MlflowClient

    demo_run, command = demo_run

    experiment_id, parent, members = _member_runs(demo_run)
    parent_name = parent.info.run_name
    assert len(members) >= 4
    # a clone born in the last generation: its run holds a fitness point for every generation
    clone = max((run for run in members.values() if run.data.tags["evo_sft.parent_member_id"]),
                key=lambda run: int(run.data.tags["evo_sft.generation_born"]))
    assert clone.data.tags["evo_sft.generation_born"] == str(GENERATIONS)
    donor = members[f"member-{clone.data.tags['evo_sft.parent_member_id']}"]
    history = MlflowClient(f"sqlite:///{demo_run / 'mlflow.db'}").get_metric_history(clone.info.run_id, "fitness")
    steps = sorted(point.step for point in history)
    assert len(steps) == len(set(steps)) == GENERATIONS

    ui = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=subprocess_env(PATH=path_without_the_venv()), cwd=demo_run.parent)
    try:
        heading = ui.stdout.readline()
        match = re.fullmatch(rf"MLflow UI of {re.escape(str(demo_run))} on (http://127\.0\.0\.1:(\d+)) "
                             r"\(Ctrl-C stops it\)\n", heading)
        assert match, heading + ui.stdout.read() if ui.poll() is not None else heading
        server, port = match.group(1), int(match.group(2))
        runs_page = f"{server}/#/experiments/{experiment_id}{MODEL_TRAINING}"
        assert ui.stdout.readline() == f"  runs:      {runs_page}\n"
        assert ui.stdout.readline() == \
            f"  evolution: {server}/#/experiments/{experiment_id}/runs/{parent.info.run_id}{MODEL_TRAINING}\n"
        _look_around(server, runs_page, experiment_id, parent_name, members, clone, donor)
    finally:
        ui.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = ui.communicate(timeout=60)
    assert (ui.returncode, rest) == (0, "\nMLflow UI stopped\n")
    assert _closed(port), "the MLflow server outlived `evo-sft ui`"


def _look_around(server, runs_page, experiment_id, parent_name, members, clone, donor) -> None:
    from playwright.sync_api import expect

    runs_png, chart_png, *picture_pngs = fresh_screenshots(
        "mlflow_experiment_runs.png", "mlflow_member_fitness.png",
        *(f"mlflow_{name}" for name in ("fitness_curves.png", "family_tree.png", "schedule.png")))
    pictures = dict(zip(("fitness_curves.png", "family_tree.png", "schedule.png"), picture_pngs))

    with browser_page() as page:
        # the page `evo-sft ui` names opens on the runs, the parent run first, its members shown
        page.goto(runs_page)
        parent_link = page.get_by_role("link", name=parent_name, exact=True)
        expect(parent_link).to_be_visible()
        for name in members:
            expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
        page.screenshot(path=str(runs_png), full_page=True)

        # the parent run's page: its description, whose link opens its pictures among the artifacts
        parent_link.click()
        expect(page.get_by_text("An evo-sft evolution").first).to_be_visible()
        page = _follow(page, "artifacts", rf"/runs/\w+/artifacts\{MODEL_TRAINING}$")
        for name, png in pictures.items():
            page.get_by_text(name, exact=True).first.click()  # in the artifact tree
            image = page.get_by_role("img", name=name, exact=True)
            expect(image).to_be_visible()
            page.wait_for_function("image => image.complete && image.naturalWidth > 600", arg=image.element_handle())
            page.screenshot(path=str(png), full_page=True)

        # the clone's run page -> its `fitness` metric -> a chart over every generation
        page.goto(f"{server}/#/experiments/{experiment_id}/runs/{clone.info.run_id}{MODEL_TRAINING}")
        expect(page.get_by_text("Parent run", exact=True).first).to_be_visible()
        page.get_by_role("link", name="fitness", exact=True).click()
        page.get_by_placeholder("Search metric charts").fill("fitness")
        expect(page.get_by_text(f"{clone.info.run_name} (fitness)", exact=True).first).to_be_visible()
        chart = page.locator(".js-plotly-plot").first
        expect(chart).to_be_visible()
        expect(page.get_by_text("train_loss", exact=True)).to_have_count(0)  # the search filters (once it has run)
        # a line through its points (from generation 1: its ancestors'), not a lone dot
        expect(chart.locator(".scatterlayer .trace path.js-line").first).to_have_attribute("d", re.compile(r"^M[^M]+L"))
        page.wait_for_timeout(1000)  # let the plot finish its transition
        page.screenshot(path=str(chart_png), full_page=True)

        # the clone's description links to its parent member's run
        page.goto(f"{server}/#/experiments/{experiment_id}/runs/{clone.info.run_id}{MODEL_TRAINING}")
        page = _follow(page, donor.info.run_name.replace("-", " "), rf"/runs/{donor.info.run_id}\{MODEL_TRAINING}$")
        expect(page.get_by_text(f"Member {donor.info.run_name.split('-')[1]}", exact=False).first).to_be_visible()

    for png in (runs_png, chart_png, *pictures.values()):
        assert_real_screenshot(png)
