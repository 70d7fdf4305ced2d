"""The deploy kit, checked offline: the Dockerfiles, compose file and Kubernetes manifests parse, every
``pagedllm serve`` flag they pass is accepted by the CLI's own parser, the compose file wires Prometheus and Grafana
to the kit's files, the manifests are valid Kubernetes objects (the OpenAPI schemas bundled with
kubernetes-validate), grace periods outlast the shutdown timeout, the Dockerfiles pass hadolint, and the KubeRay example
(deploy/kubernetes/ray/: its RayCluster has no schema offline, so its structure is checked here and each pod
template is validated as a Pod) runs a serve command the CLI accepts on as many GPUs as its ranks. The two
checkers are large (108 MB, 55 MB), so not in the test extra: `pip install -e '.[deploy-check]'` (CI does)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pagedllm.entrypoints.openai.cli_args import add_serve_args

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "Dockerfile.cpu"]
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
RAY_DIR = DEPLOY / "kubernetes" / "ray"  # apart: `kubectl apply -f deploy/kubernetes/` must not start a RayCluster
RAY_MANIFEST = RAY_DIR / "ray-cluster.yaml"
_ENV_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")  # compose's ${VAR:-default}


def parse_serve_flags(argv: list[str]) -> argparse.Namespace:
    """``argv`` as ``pagedllm serve`` parses it; a flag or value it refuses fails the test with argparse's words."""
    parser = argparse.ArgumentParser(prog="pagedllm serve", exit_on_error=False)
    add_serve_args(parser)
    try:
        return parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:  # an unknown flag exits even with exit_on_error=False
        pytest.fail(f"pagedllm serve refuses {argv}: {exc}")


def entrypoint_args(dockerfile: Path) -> list[str]:
    """The arguments after ``pagedllm serve`` in the Dockerfile's ENTRYPOINT (its JSON form)."""
    line = next(line for line in dockerfile.read_text().splitlines() if line.startswith("ENTRYPOINT"))
    command = json.loads(line.removeprefix("ENTRYPOINT"))
    assert command[:2] == ["pagedllm", "serve"], command
    return command[2:]


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def compose_server_args() -> list[str]:
    return [_ENV_DEFAULT.sub(r"\2", str(arg)) for arg in compose()["services"]["pagedllm"]["command"]]


def compose_mounts(service: str) -> dict[str, Path]:
    """The service's bind mounts of the kit's files: the path in the container -> the file or folder in deploy/."""
    mounts = [volume.split(":") for volume in compose()["services"][service]["volumes"]]
    return {target: DEPLOY / source for source, target, *_ in mounts if source.startswith("./")}


def manifest_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def deployment() -> dict:
    return next(doc for _, doc in manifest_docs() if doc["kind"] == "Deployment")


def container_args() -> list[str]:
    return deployment()["spec"]["template"]["spec"]["containers"][0]["args"]


def ray_docs() -> dict[str, dict]:
    """The Ray example's objects by kind."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all(RAY_MANIFEST.read_text()) if doc}


def ray_pod_templates() -> dict[str, dict]:
    """The RayCluster's pod templates: "head" and each worker group's name."""
    spec = ray_docs()["RayCluster"]["spec"]
    return {"head": spec["headGroupSpec"]["template"],
            **{group["groupName"]: group["template"] for group in spec["workerGroupSpecs"]}}


def ray_head_container() -> dict:
    return ray_pod_templates()["head"]["spec"]["containers"][0]


def ray_head_serve_args() -> list[str]:
    """The arguments after ``pagedllm serve`` in the head's start script (its ``exec pagedllm serve`` line)."""
    script = ray_head_container()["args"][0].replace("\\\n", " ")  # join the shell's continued lines
    [line] = [line.strip() for line in script.splitlines() if line.strip().startswith("exec pagedllm serve")]
    return shlex.split(line)[3:]


def gpus(container: dict) -> int:
    return int(container["resources"]["limits"]["nvidia.com/gpu"])


def assert_valid_kubernetes_object(doc: dict, where: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    try:
        kubernetes_validate.validate(doc, version, strict=True)  # strict: unknown fields are errors too
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where}: {doc['kind']} is not a valid Kubernetes {version} object: {exc}")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_flags_are_accepted(dockerfile):
    args = parse_serve_flags([*entrypoint_args(dockerfile), "some/model"])
    assert args.host == "0.0.0.0" and args.port == 8000  # reachable from outside the container


def test_dockerfile_runs_as_non_root_with_a_healthcheck():
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert re.search(r"^USER 1000", text, re.MULTILINE), dockerfile.name
        assert "HEALTHCHECK" in text and "/health" in text, dockerfile.name
        assert text.count("FROM ") >= 2, f"{dockerfile.name} is not multi-stage"


def test_compose_flags_are_accepted_and_grace_outlasts_shutdown():
    args = parse_serve_flags([*entrypoint_args(ROOT / "Dockerfile"), *compose_server_args()])
    grace = compose()["services"]["pagedllm"]["stop_grace_period"]
    assert float(grace.removesuffix("s")) > args.graceful_shutdown_timeout


def test_compose_wires_prometheus_and_grafana_to_the_kit():
    prometheus, grafana = compose_mounts("prometheus"), compose_mounts("grafana")
    assert all(path.exists() for path in [*prometheus.values(), *grafana.values()])
    config = yaml.safe_load(prometheus["/etc/prometheus/prometheus.yml"].read_text())
    assert set(config["rule_files"]) <= set(prometheus), "a rule file Prometheus reads is not mounted"
    [job] = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["pagedllm:8000"]  # the compose service, the image's port
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    down = next(rule for group in rules["groups"] for rule in group["rules"] if rule["alert"] == "PagedLLMDown")
    assert f'job="{job["job_name"]}"' in down["expr"]
    provisioning = grafana["/etc/grafana/provisioning"]
    [provider] = yaml.safe_load((provisioning / "dashboards" / "dashboards.yml").read_text())["providers"]
    assert (grafana[provider["options"]["path"]] / "pagedllm.json").exists()
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "pagedllm.json").read_text())
    used = {panel["datasource"]["uid"] for panel in [*dashboard["panels"], *dashboard["templating"]["list"]]}
    assert used == {source["uid"]}, "a panel names a datasource Grafana is not provisioned with"


def test_kubernetes_flags_are_accepted_and_grace_outlasts_shutdown():
    args = parse_serve_flags([*entrypoint_args(ROOT / "Dockerfile"), *container_args()])
    pod = deployment()["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > args.graceful_shutdown_timeout
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {mount["mountPath"] for mount in container["volumeMounts"]} >= {"/dev/shm", "/models"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_manifests_are_valid_kubernetes_objects(path):
    for doc in yaml.safe_load_all(path.read_text()):
        assert_valid_kubernetes_object(doc, path.name)


def test_hpa_scales_on_the_metric_the_adapter_serves():
    docs = {doc["kind"]: doc for _, doc in manifest_docs()}
    [metric] = docs["HorizontalPodAutoscaler"]["spec"]["metrics"]
    [rule] = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])["rules"]
    served = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"),
                    rule["seriesQuery"].split("{")[0])
    assert metric["pods"]["metric"]["name"] == served == "pagedllm_num_requests_waiting"


@pytest.mark.parametrize("dockerfile", [*DOCKERFILES, RAY_DIR / "Dockerfile"], ids=lambda path: path.parent.name + "/" + path.name)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")  # the venv's, unactivated
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install -e '.[deploy-check]')")
    result = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(dockerfile)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ray_head_serves_on_the_ray_executor_with_grace_to_drain():
    args = parse_serve_flags(ray_head_serve_args())
    assert args.distributed_executor_backend == "ray"
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (8, 2)
    assert args.host == "0.0.0.0"  # the pod's command replaces the image's entrypoint and its --host
    head = ray_pod_templates()["head"]["spec"]
    assert head["terminationGracePeriodSeconds"] > args.graceful_shutdown_timeout
    ports = {port["name"]: port["containerPort"] for port in ray_head_container()["ports"]}
    [service_port] = ray_docs()["Service"]["spec"]["ports"]
    assert ports[service_port["targetPort"]] == args.port == service_port["port"] == 8000


def test_ray_cluster_has_one_gpu_per_rank():
    args = parse_serve_flags(ray_head_serve_args())
    ranks = args.tensor_parallel_size * args.pipeline_parallel_size
    spec = ray_docs()["RayCluster"]["spec"]
    workers = sum(group["replicas"] * gpus(group["template"]["spec"]["containers"][0])
                  for group in spec["workerGroupSpecs"])
    assert gpus(ray_head_container()) + workers == ranks
    env = {var["name"]: var.get("value") for var in ray_head_container()["env"]}
    assert int(env["WAIT_FOR_GPUS"]) == ranks  # the head starts the server once the workers joined


def test_ray_cluster_has_the_structure_kuberay_requires():
    """What the RayCluster CRD (ray.io/v1) requires, checked by hand: its schema is not available offline."""
    cluster = ray_docs()["RayCluster"]
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    # The containers run their own command; KubeRay then starts no Ray unless they run its generated `ray start`.
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    spec = cluster["spec"]
    pinned = re.search(r'"ray\[default\]==([\d.]+)"', (RAY_DIR / "Dockerfile").read_text()).group(1)
    assert spec["rayVersion"] == pinned  # KubeRay reads it; it must be the image's Ray
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        params = group["rayStartParams"]  # a map of strings: a bare number or boolean is refused by the CRD
        assert all(isinstance(value, str) for value in params.values()), params
        [container] = group["template"]["spec"]["containers"]
        assert "$KUBERAY_GEN_RAY_START_CMD" in container["args"][0], container["name"]
        assert {mount["mountPath"] for mount in container["volumeMounts"]} >= {"/dev/shm", "/models"}
    names = [group["groupName"] for group in spec["workerGroupSpecs"]]
    assert names and len(set(names)) == len(names)
    for group in spec["workerGroupSpecs"]:
        assert isinstance(group["replicas"], int) and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert gpus(group["template"]["spec"]["containers"][0]) > 0


def test_ray_head_probes_the_server_and_the_service_selects_the_head():
    head = ray_head_container()
    assert head["startupProbe"]["httpGet"]["path"] == "/health"
    assert head["livenessProbe"]["httpGet"]["path"] == "/health"
    assert head["readinessProbe"]["httpGet"]["path"] == "/ready"
    selector = ray_docs()["Service"]["spec"]["selector"]
    # The labels KubeRay puts on the head pod.
    assert selector == {"ray.io/cluster": ray_docs()["RayCluster"]["metadata"]["name"], "ray.io/node-type": "head"}
    claims = {volume["persistentVolumeClaim"]["claimName"] for template in ray_pod_templates().values()
              for volume in template["spec"]["volumes"] if "persistentVolumeClaim" in volume}
    assert claims == {ray_docs()["PersistentVolumeClaim"]["metadata"]["name"]}


@pytest.mark.parametrize("group", ["head", "gpu-8x"])
def test_ray_pod_templates_are_valid_pods(group):
    template = ray_pod_templates()[group]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {**template.get("metadata", {}), "name": group},
           "spec": template["spec"]}
    assert_valid_kubernetes_object(pod, f"ray-cluster.yaml {group} pod template")


@pytest.mark.parametrize("kind", ["Service", "PersistentVolumeClaim"])
def test_ray_example_kubernetes_objects_are_valid(kind):
    assert_valid_kubernetes_object(ray_docs()[kind], f"ray-cluster.yaml {kind}")
