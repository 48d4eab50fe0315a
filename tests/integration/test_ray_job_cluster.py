"""`evo-sft submit --wait` on a real multi-process Ray cluster on this machine: a head node
(`ray start --head`, with the dashboard that takes job submissions) and a worker node
(`ray start --address`) with resources of its own, both on 127.0.0.1 and on free ports.

The demo config, shrunk, is submitted as a Ray Job; the job succeeds, its members ran in Ray
actors on both nodes (each node has 2 CPUs and the population is 4 members, two to an actor of
2 CPUs, so the two actors cannot fit on one node; where they ran is read back from the cluster's
state API, dead actors included), and the run folder it wrote (on this machine's disk, shared by
both nodes) resumes for one more generation on the same cluster, pointed at it with
`evo-sft resume RUN_DIR --set ray.address=HEAD:PORT`.

Each node is a `ray start --block` in its own process group; teardown signals those groups
(by the PIDs of the two `ray start` processes), then kills, by PID, any process left that
carries this cluster's private RAY_TMPDIR (a job driver or worker that left the group).
`ray stop` is never used: it would stop every other Ray session on the machine.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.paths import BIN, DEMO, EVO_SFT, REPO
from tests.helpers.processes import free_ports, subprocess_env

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

RAY = BIN / "ray"
CPUS_PER_NODE = 2
MEMBERS = 4
MEMBERS_PER_ACTOR = 2
ACTORS = MEMBERS // MEMBERS_PER_ACTOR
WORKER_RESOURCE = "evo_sft_test_worker"
SMALL = ["--set", "data.num_rows=200", "--set", "evolution.generations=2",
         "--set", "evolution.steps_per_generation=3",
         "--set", f"population.size={MEMBERS}", "--set", f"population.members_per_actor={MEMBERS_PER_ACTOR}",
         "--set", f"population.num_cpus={CPUS_PER_NODE}"]  # an actor fills a node
START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 420


def node_env(temp_root: str) -> dict:
    return subprocess_env(
        drop=("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"),
        RAY_AUTH_MODE="disabled", RAY_TMPDIR=temp_root, RAY_USAGE_STATS_ENABLED="0",
        # on SIGTERM, a node stops its processes at once instead of first draining for up to a minute
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        # the venv is the cluster's Python, as if activated: the job's entrypoint is `python -m evo_sft.cli`
        PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))


def start_node(args: list, temp_dir: str, env: dict, log: Path) -> subprocess.Popen:
    """`ray start --block ...` in a process group of its own, so all of the node goes with it."""
    with open(log, "w") as out:
        return subprocess.Popen([str(RAY), "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                                 f"--num-cpus={CPUS_PER_NODE}", f"--temp-dir={temp_dir}",
                                 f"--object-store-memory={200 * 1024 ** 2}", *map(str, args)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def node_ports(ports: list[int]) -> list[str]:
    """Ports every raylet on a host needs distinct from the other's."""
    names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
    return [f"{name}={port}" for name, port in zip(names, ports, strict=True)]


def wait_for(what: str, check, nodes: list[subprocess.Popen], logs: list[Path], timeout: float = START_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node, log in zip(nodes, logs):
            if node.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {node.returncode} before {what}:\n"
                                   f"{log.read_text()[-4000:]}")
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no {what} within {timeout:.0f} s:\n" + "\n".join(log.read_text()[-2000:] for log in logs))


def stop_node(node: subprocess.Popen) -> None:
    """SIGTERM the node's process group (led by the `ray start` PID), then SIGKILL what is left."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(node.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            node.poll()
            try:
                os.killpg(node.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def processes_of(temp_root: str) -> list:
    """Processes of this user that carry this cluster's RAY_TMPDIR (what its nodes started)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get("RAY_TMPDIR") == temp_root:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_leftovers(temp_root: str, grace: float = 10.0) -> list[str]:
    """Ray's worker processes (actors, the job's driver) run in sessions of their own, outside
    their node's process group; they exit once their raylet is gone. Wait for that, then kill
    by PID whatever of this cluster is still there; returns what had to be killed."""
    deadline = time.monotonic() + grace
    while processes_of(temp_root) and time.monotonic() < deadline:
        time.sleep(0.2)
    left, described = processes_of(temp_root), []
    for process in left:
        try:
            described.append(f"{process.pid} {' '.join(process.cmdline())[:200]}")
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    return described


@pytest.fixture(scope="module")
def cluster():
    """Head (dashboard, GCS) and worker node, each of 2 CPUs, under a private short /tmp folder."""
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    root = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths stay short
    env = node_env(root)
    gcs, dashboard, client, *ports = free_ports(3 + 12)
    logs = [Path(root) / "head.log", Path(root) / "worker.log"]
    nodes, started = [], time.monotonic()
    try:
        nodes.append(start_node(["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
                                 *node_ports(ports[:6])], f"{root}/h", env, logs[0]))
        address = f"http://127.0.0.1:{dashboard}"
        wait_for("dashboard", lambda: urllib.request.urlopen(f"{address}/api/version", timeout=2).status == 200,
                 nodes, logs[:1])
        nodes.append(start_node([f"--address=127.0.0.1:{gcs}", f"--resources={json.dumps({WORKER_RESOURCE: 1})}",
                                 *node_ports(ports[6:])], f"{root}/w", env, logs[1]))
        from ray.util.state import list_nodes

        def two_nodes():
            alive = [n for n in list_nodes(address=address, detail=True) if n.state == "ALIVE"]
            return alive if len(alive) == 2 else None

        alive = wait_for("second node", two_nodes, nodes, logs)
        print(f"\ntwo-node cluster up in {time.monotonic() - started:.1f} s")
        head = next(n.node_id for n in alive if n.is_head_node)
        worker = next(n.node_id for n in alive if not n.is_head_node)
        yield {"address": address, "gcs": f"127.0.0.1:{gcs}", "env": env, "head": head, "worker": worker,
               "nodes": alive}
    finally:
        stopping = time.monotonic()
        for node in reversed(nodes):
            stop_node(node)
        killed = kill_leftovers(root)
        print(f"\nnodes (`ray start` PIDs {[n.pid for n in nodes]}) stopped in {time.monotonic() - stopping:.1f} s; "
              f"stragglers killed by PID: {killed or 'none'}")
        shutil.rmtree(root, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    assert not processes_of(root), "processes of the cluster are still running after teardown"


def evo(args, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(EVO_SFT), *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=timeout)


def member_actors(address: str) -> dict:
    """actor id -> node id of every MemberActor the cluster has seen, dead ones included."""
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("class_name", "=", "MemberActor")], detail=True, limit=10000,
                         raise_on_missing_output=False)
    return {a.actor_id: a.node_id for a in actors}


def test_submitted_demo_runs_on_both_nodes_and_resumes(cluster):
    started = time.monotonic()
    nodes = {n.node_id: n for n in cluster["nodes"]}
    assert set(nodes) == {cluster["head"], cluster["worker"]}
    assert nodes[cluster["worker"]].resources_total.get(WORKER_RESOURCE) == 1
    assert WORKER_RESOURCE not in nodes[cluster["head"]].resources_total
    assert all(n.resources_total.get("CPU") == CPUS_PER_NODE for n in nodes.values())

    run_dir = Path(tempfile.mkdtemp(prefix="rjrun", dir="/tmp")) / "run"
    try:
        result = evo(["submit", DEMO, "--address", cluster["address"], "--run-dir", run_dir, "--wait", *SMALL],
                     env=cluster["env"], timeout=JOB_TIMEOUT_S)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-6000:]
        assert re.search(r"job \S+: SUCCEEDED", output), output[-3000:]
        assert "=== evo-sft summary ===" in result.stdout, output[-3000:]
        assert "generation 2 " in result.stdout
        checkpoints = sorted((run_dir / "checkpoints").iterdir())
        assert checkpoints, "the job wrote no checkpoint"
        assert (run_dir / "best_adapter").is_dir()
        status = evo(["status", run_dir, "--json"], env=cluster["env"], timeout=120)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["generation"] == 2
        assert len(json.loads(status.stdout)["members"]) == MEMBERS
        submitted = time.monotonic()

        # Where the members ran: 2 actors of 2 CPUs on two nodes of 2 CPUs, so both nodes.
        job_actors = member_actors(cluster["address"])
        assert len(job_actors) >= ACTORS, job_actors
        assert set(job_actors.values()) == {cluster["head"], cluster["worker"]}, job_actors
        print("job actors per node:", {n[:8]: list(job_actors.values()).count(n) for n in set(job_actors.values())})

        # The run folder resumes for one more generation, on the same cluster.
        resumed = evo(["resume", run_dir, "--generations", 3, "--set", f"ray.address={cluster['gcs']}"],
                      env=cluster["env"], timeout=JOB_TIMEOUT_S)
        resumed_output = resumed.stdout + resumed.stderr
        assert resumed.returncode == 0, resumed_output[-6000:]
        assert f"resuming {run_dir}" in resumed.stdout
        assert "generation 3 " in resumed.stdout and "=== evo-sft summary ===" in resumed.stdout
        status = evo(["status", run_dir, "--json"], env=cluster["env"], timeout=120)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["generation"] == 3
        resume_actors = {a: n for a, n in member_actors(cluster["address"]).items() if a not in job_actors}
        assert len(resume_actors) >= ACTORS, "the resumed run's members did not run on the cluster"
        assert set(resume_actors.values()) == {cluster["head"], cluster["worker"]}, resume_actors
    finally:
        shutil.rmtree(run_dir.parent, ignore_errors=True)
    print(f"job {submitted - started:.0f} s, resume {time.monotonic() - submitted:.0f} s on the two-node cluster")
