"""Runs comparable in the MLflow UI, for real: two tiny training runs (fedmtl and fedavg) through
the Prefect flow into a temporary SQLite store, read back through a real ``mlflow server``'s REST
API and its web UI in headless Chromium (Playwright), and compared with ``fedmtl compare``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.data.validation import validate_partitions
from tests.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT_COPY = REPO / ".fedmtl/screenshots/mlflow-experiment.png"
METHODS = ("fedmtl", "fedavg")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Validated partitions and an empty tracking store (created here, so that the server and
    the flow never race to create its tables)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow-ui")
    cfg = load_config(None, tiny_overrides(root))
    (root / "mlflow").mkdir()
    MlflowClient(cfg.tracking.tracking_uri).search_experiments()
    prepare(cfg.data)
    partition(cfg.data)
    validate_partitions(
        cfg.data.partitions_dir,
        read_manifest(cfg.data.partitions_dir),
        cfg.validation,
        cfg.data.validation_dir,
    )
    return root, cfg


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server_process(store):
    """``mlflow server`` on the store (127.0.0.1, a free port, one worker), started before the
    training so that it boots meanwhile; always stopped at the end of the module."""
    root, cfg = store
    port = _free_port()
    workdir = root / "server"
    workdir.mkdir()
    log = workdir / "server.log"
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        cfg.tracking.tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # no GenAI job runner (a pool of huey consumers): the runs UI and REST API do not need it
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("wb") as out:
        # its own process group: uvicorn (and any helper) stop with it
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,
        )
        try:
            yield proc, f"http://127.0.0.1:{port}", log
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return  # the whole group is gone
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the server is gone; its children too?
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(1)


@pytest.fixture(scope="module")
def trained(prefect_harness, store, server_process):
    """Two runs on the same partitions: fedmtl (with a child run per client) and fedavg."""
    from flows.training import federated_training

    root, cfg = store
    results = {}
    for method in METHODS:
        run_cfg = load_config(
            None,
            tiny_overrides(
                root, **{"algorithm.method": method, "tracking.client_runs": method == "fedmtl"}
            ),
        )
        results[method] = federated_training(run_cfg.model_dump(mode="json"))
    return root, cfg, results


@pytest.fixture(scope="module")
def server(trained, server_process) -> str:
    """The server's base URL once it answers ``/health``."""
    proc, base, log = server_process
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return base
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(
                f"mlflow server did not answer /health on {base} in 120 s:\n"
                f"{log.read_text()[-3000:]}"
            )
        time.sleep(0.3)


def _api(base: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """One call of MLflow's REST API (GET with a query string, or POST with a JSON body)."""
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{url}: HTTP {exc.code}: {exc.read()[:500]!r}") from None


def _experiment_id(base: str, name: str) -> str:
    return _api(base, "experiments/get-by-name", experiment_name=name)["experiment"][
        "experiment_id"
    ]


def _parent_runs(base: str, experiment_id: str) -> dict[str, dict]:
    """The parent runs by method, as the REST API returns them."""
    runs = _api(base, "runs/search", {"experiment_ids": [experiment_id], "max_results": 100}).get(
        "runs", []
    )
    parents = {}
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        if "mlflow.parentRunId" not in tags:
            parents[tags["method"]] = run
    return parents


def test_rest_api_runs_params_tags_children_and_artifacts(trained, server):
    _, cfg, results = trained
    experiment_id = _experiment_id(server, cfg.tracking.experiment)
    parents = _parent_runs(server, experiment_id)
    assert set(parents) == set(METHODS)
    for method, run in parents.items():
        info = run["info"]
        assert info["run_id"] == results[method]["mlflow_run_id"]
        assert info["status"] == "FINISHED"
        assert info["run_name"].startswith(f"digits-{method}-")
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["algorithm.method"] == method
        assert params["training.rounds"] == "2" and params["grouping.method"] == "column"
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["method"] == method and tags["grouping"] == "column" and tags["privacy"]
        assert tags["data_version"] == results[method]["data_version"] and tags["git_commit"]
        assert tags["prefect_flow_run_id"]

    # parent/child runs: a child per client under the fedmtl run only
    parent_id = parents["fedmtl"]["info"]["run_id"]
    children = _api(
        server,
        "runs/search",
        {"experiment_ids": [experiment_id], "filter": f"tags.mlflow.parentRunId = '{parent_id}'"},
    )["runs"]
    assert len(children) == results["fedmtl"]["clients"]
    assert all(c["info"]["run_name"].startswith("client-") for c in children)

    # plots as artifacts, served by the tracking server
    for method, run in parents.items():
        listed = _api(server, "artifacts/list", run_id=run["info"]["run_id"], path="plots")
        names = {f["path"] for f in listed.get("files", [])}
        expected = {
            "plots/convergence.png",
            "plots/clients_global_vs_personal.png",
            "plots/personalisation_gain.png",
        }
        assert expected <= names, (method, names)
    fedmtl_plots = {
        f["path"] for f in _api(server, "artifacts/list", run_id=parent_id, path="plots")["files"]
    }
    assert "plots/group_assignment.png" in fedmtl_plots
    with urllib.request.urlopen(
        f"{server}/get-artifact?"
        + urllib.parse.urlencode({"path": "plots/personalisation_gain.png", "run_uuid": parent_id}),
        timeout=30,
    ) as response:
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rest_api_metric_history_has_one_step_per_round(trained, server):
    _, cfg, results = trained
    for method in METHODS:
        run_id = results[method]["mlflow_run_id"]
        for key in ("personal/accuracy/mean", "global/f1/mean", "time/local_train_s"):
            history = _api(server, "metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
            assert sorted(m["step"] for m in history) == list(range(1, cfg.training.rounds + 1)), (
                method,
                key,
            )


def test_rest_api_registered_model_versions(trained, server):
    _, cfg, results = trained
    name = cfg.tracking.registered_model
    versions = _api(server, "model-versions/search", filter=f"name = '{name}'")["model_versions"]
    assert {v["run_id"] for v in versions} == {results[m]["mlflow_run_id"] for m in METHODS}
    alias = _api(server, "registered-models/alias", name=name, alias="challenger")["model_version"]
    assert (
        alias["version"] == results[METHODS[-1]]["model_version"]
    )  # the last registered is challenger
    assert alias["run_id"] == results[METHODS[-1]]["mlflow_run_id"]


def test_experiment_page_lists_both_runs_in_the_browser(trained, server, tmp_path):
    if not CHROMIUM.exists():
        why = f"{CHROMIUM} is not installed (apt-get install chromium): no browser to drive"
        if os.environ.get("FEDMTL_REQUIRE_BROWSER"):  # CI (.ci/run): a skip would check nothing
            pytest.fail(why)
        pytest.skip(why)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(
            "playwright is not installed (pip install playwright; browsers come from Debian)"
        )
    _, cfg, results = trained
    experiment_id = _experiment_id(server, cfg.tracking.experiment)
    names = [
        _api(server, "runs/get", run_id=results[m]["mlflow_run_id"])["run"]["info"]["run_name"]
        for m in METHODS
    ]
    shot = tmp_path / "mlflow-experiment.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1920, "height": 1000})
            # MLflow 3's UI opens an experiment in its GenAI view (traces) unless told otherwise:
            # workflowType=machine_learning is the "Model training" switch, which lists the runs
            page.goto(
                f"{server}/#/experiments/{experiment_id}?workflowType=machine_learning",
                wait_until="domcontentloaded",
            )
            for name in names:
                page.get_by_text(name, exact=True).first.wait_for(state="visible", timeout=60_000)
            listed = page.locator("body").inner_text()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert all(name in listed for name in names), listed[:2000]
    assert shot.stat().st_size > 0
    SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT_COPY)


def _row(lines: list[str], key: str) -> list[str]:
    """The cells after the key of the table row for ``key``."""
    line = next(
        line for line in lines if line.startswith("│") and line.split("│")[1].strip() == key
    )
    return [cell.strip() for cell in line.split("│")[2:-1]]


def test_cli_compare_marks_differences_and_the_better_value(trained):
    from cli import app

    _, cfg, results = trained
    a, b = (results[m]["mlflow_run_id"] for m in METHODS)
    out = CliRunner().invoke(app, ["compare", a, b, "--tracking-uri", cfg.tracking.tracking_uri])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert _row(lines, "algorithm.method") == list(METHODS)
    assert "training.rounds" not in out.output  # equal settings are left out
    for key, better in (
        ("personal/accuracy/mean", max),
        ("global/f1/mean", max),
        ("personalisation_gain/accuracy", max),
        ("time/local_train_s", min),
    ):
        cells = _row(lines, key)
        values = [float(c.split()[0]) for c in cells]
        marked = [i for i, c in enumerate(cells) if c.endswith("✓")]
        if values[0] == values[1]:
            assert marked == [], (key, cells)
        else:
            assert marked == [values.index(better(values))], (key, cells)
    assert not any("✓" in cell for cell in _row(lines, "clients/participating"))  # a count: no mark

    # by run name, only some metrics, and every parameter
    name = next(line for line in lines if line.startswith("run 1:")).split()[2]
    assert name.startswith("digits-fedmtl-")
    out = CliRunner().invoke(
        app,
        [
            "compare",
            name,
            b,
            "--tracking-uri",
            cfg.tracking.tracking_uri,
            "--metric",
            "personal/*",
            "--all-params",
        ],
    )
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert _row(lines, "training.rounds") == ["2", "2"]
    assert _row(lines, "personal/accuracy/mean")
    assert "global/accuracy/mean" not in out.output


def test_cli_compare_and_ui_errors_name_the_run_or_store(trained, tmp_path):
    from cli import app

    _, cfg, results = trained
    unknown = "0123456789abcdef0123456789abcdef"
    out = CliRunner().invoke(
        app,
        [
            "compare",
            results["fedmtl"]["mlflow_run_id"],
            unknown,
            "--tracking-uri",
            cfg.tracking.tracking_uri,
        ],
    )
    assert out.exit_code == 2
    assert unknown in out.output

    missing = f"sqlite:///{tmp_path / 'nowhere.db'}"
    for args in (
        ["compare", "a", "b", "--tracking-uri", missing],
        ["ui", "--tracking-uri", missing],
    ):
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 2 and "nowhere.db" in out.output, out.output
        assert not (tmp_path / "nowhere.db").exists()  # never creates an empty store
