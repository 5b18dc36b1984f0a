"""What deploy/ ships is valid and refers only to things that exist.

Prometheus rules are checked and unit-tested with promtool (Debian's `prometheus` package;
.ci/run installs it). Without promtool these tests skip on a developer's machine and fail
in CI (``CI`` set), so that a CI run can never pass without them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from tests.support import healthcheck_command
from workers.kinds import WORKER_KINDS
from workers.metrics import Metrics
from workers.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules.test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "chargeline.json"
ENV_EXAMPLE = DEPLOY / "chargeline.env.example"
K8S = DEPLOY / "k8s"

# `chargeline worker KIND` for every kind of SPEC.md section 8 (the code may offer more).
SPEC_WORKER_KINDS = {"charges", "usage", "outbox", "reloads", "payouts", "expiry"}
# Metrics named in the issue that the dashboard and rules cover while their code is still
# being written in other branches; a name leaves this set once workers/metrics.py has it.
METRICS_IN_FLIGHT = {
    "chargeline_reloads_total",
    "chargeline_stripe_request_seconds",
    "chargeline_payouts_total",
    "chargeline_payout_amount_total",
    "chargeline_charges_awaiting_payout",
    "chargeline_oldest_unpaid_charge_age_seconds",
    "chargeline_verify_violations",
    "chargeline_verify_last_run_timestamp_seconds",
}
# The list for the dashboard: throughput by outcome, lag, batch latency, dead
# letters, outbox depth, alerts, reloads, payouts, verify drift.
DASHBOARD_MUST_SHOW = {
    "chargeline_events_total",
    "chargeline_consumer_lag",
    "chargeline_event_lag_seconds",
    "chargeline_batch_duration_seconds",
    "chargeline_dead_letters_total",
    "chargeline_outbox_depth",
    "chargeline_alerts_total",
    "chargeline_reloads_total",
    "chargeline_payouts_total",
    "chargeline_verify_violations",
}
ALERTS = {
    "ChargelineWorkerDown",
    "ChargelineWorkersAbsent",
    "ChargelineWorkerNotReady",
    "ChargelineConsumerLagGrowing",
    "ChargelineConsumerStalled",
    "ChargelineWebhookEndpointFailing",
    "ChargelineDeadLetterRate",
    "ChargelineUnprocessableRecord",
    "ChargelineLaneStalled",
    "ChargelineApiErrors",
    "ChargelineOutboxStuck",
    "ChargelineInfrastructureRetries",
    "ChargelineReloadFailures",
    "ChargelineVerifyViolations",
    "ChargelineVerifyNotRunning",
}


# --- promtool --------------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool not found; CI must install Debian's `prometheus` (.ci/run)")
        pytest.skip("promtool not found: `apt-get install prometheus` to run the rule tests")
    return found


def run_promtool(*args: str) -> str:
    done = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=300, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_promtool_check_rules() -> None:
    assert f"SUCCESS: {len(ALERTS)} rules found" in run_promtool("check", "rules", str(RULES))


def test_promtool_test_rules() -> None:
    run_promtool("test", "rules", str(RULES_TEST))


def test_promtool_check_prometheus_config() -> None:
    run_promtool("check", "config", str(PROMETHEUS_CONFIG))


def test_every_alert_has_a_unit_test_and_a_runbook() -> None:
    rules = load_yaml(RULES)[0]
    defined = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert defined == ALERTS
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert {"summary", "description", "runbook"} <= rule["annotations"].keys()
    tests = load_yaml(RULES_TEST)[0]["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    assert firing == ALERTS, f"no firing case for {ALERTS - firing}"
    assert silent == ALERTS, f"no silent case for {ALERTS - silent}"
    runbook = (REPO / "deploy" / "README.md").read_text()
    missing = [alert for alert in sorted(ALERTS) if f"`{alert}`" not in runbook]
    assert not missing, f"deploy/README.md says nothing about {missing}"


# --- YAML everywhere -------------------------------------------------------------------------


def load_yaml(path: Path) -> list[Any]:
    """Every document of ``path`` (PyYAML is a dev dependency)."""
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


YAML_FILES = sorted(
    path.relative_to(DEPLOY) for path in DEPLOY.rglob("*") if path.suffix in {".yml", ".yaml"}
)


@pytest.mark.parametrize("relative", YAML_FILES, ids=str)
def test_every_yaml_file_under_deploy_parses(relative: Path) -> None:
    documents = load_yaml(DEPLOY / relative)
    assert documents, f"{relative} is empty"
    assert all(isinstance(doc, dict) for doc in documents)


# --- metric names ----------------------------------------------------------------------------


@cache
def exported_metric_names() -> frozenset[str]:
    """Every series name workers/metrics.py can export (counters with _total, histograms
    with _bucket/_sum/_count)."""
    names: set[str] = set()
    for family in Metrics(CollectorRegistry()).registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("", "_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return frozenset(names)


def _base_name(series: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", series)


def known_metric(series: str) -> bool:
    return series in exported_metric_names() or _base_name(series) in METRICS_IN_FLIGHT


def metric_names(expression: str) -> set[str]:
    return set(re.findall(r"\bchargeline_[a-z0-9_]+", expression))


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_expressions() -> list[str]:
    return [
        target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])
    ]


def test_rules_and_dashboard_name_only_metrics_that_exist() -> None:
    rules_text = RULES.read_text()
    used = metric_names(rules_text) | {
        name for expr in dashboard_expressions() for name in metric_names(expr)
    }
    unknown = sorted(name for name in used if not known_metric(name))
    assert not unknown, f"not exported by workers/metrics.py: {unknown}"


def test_the_dashboard_shows_every_metric() -> None:
    shown = {_base_name(n) for expr in dashboard_expressions() for n in metric_names(expr)}
    assert shown >= DASHBOARD_MUST_SHOW, DASHBOARD_MUST_SHOW - shown
    exported = {_base_name(name) for name in exported_metric_names()}
    missing = sorted(exported - shown)
    assert not missing, f"add a panel to {DASHBOARD.relative_to(REPO)} for {missing}"


def test_dashboard_panels_are_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "chargeline"
    datasource = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")[0]
    uid = datasource["datasources"][0]["uid"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    occupied: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == uid
                assert target["expr"].count("(") == target["expr"].count(")")


# --- settings --------------------------------------------------------------------------------

SETTINGS_VARIABLES = {f"CHARGELINE_{name.upper()}" for name in Settings.model_fields}


def variables_in(text: str) -> set[str]:
    return set(re.findall(r"\bCHARGELINE_[A-Z0-9_]+\b", text))


def test_the_env_example_lists_every_setting_and_nothing_else() -> None:
    listed = {
        line.lstrip("#").split("=", 1)[0].strip()
        for line in ENV_EXAMPLE.read_text().splitlines()
        if re.match(r"^#?CHARGELINE_[A-Z0-9_]+=", line)
    }
    assert listed == SETTINGS_VARIABLES, (
        f"missing: {sorted(SETTINGS_VARIABLES - listed)}, unknown: {sorted(listed - SETTINGS_VARIABLES)}"
    )


def test_deploy_files_set_only_settings_that_exist() -> None:
    # Compose-level variables of ours that are not settings of a chargeline process.
    compose_only = {"CHARGELINE_IMAGE", "CHARGELINE_WORKER_REPLICAS"}
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.suffix in {".yml", ".yaml", ".example", ""}:
            unknown = variables_in(path.read_text()) - SETTINGS_VARIABLES - compose_only
            assert not unknown, f"{path.relative_to(REPO)} sets {sorted(unknown)}"


# --- docker compose --------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(COMPOSE)[0]
    return loaded


def test_compose_runs_the_whole_stack_from_pinned_images() -> None:
    services = compose()["services"]
    assert set(services) == {
        "postgres",
        "kafka",
        "db-roles",
        "migrate",
        "db-grants",
        "workers",
        "api",
        "prometheus",
        "grafana",
    }
    images = {name: service["image"] for name, service in services.items()}
    assert images["kafka"] == "apache/kafka:3.8.0"
    assert images["postgres"].startswith("postgres:16")
    for name, image in images.items():
        if "${" not in image:
            assert re.fullmatch(r"[a-z0-9./-]+:[A-Za-z0-9._-]+", image), (name, image)
            assert not image.endswith(":latest"), (name, image)
    workers = services["workers"]
    assert workers["command"] == ["worker", "all"]
    assert "replicas" in workers["deploy"]
    assert workers["build"]["dockerfile"] == "deploy/Dockerfile"
    assert "chargeline_runtime" in workers["environment"]["CHARGELINE_DATABASE_URL"]
    migrate = services["migrate"]
    assert "chargeline_migrator" in migrate["environment"]["CHARGELINE_DATABASE_URL"]
    assert migrate["depends_on"]["db-roles"]["condition"] == "service_completed_successfully"
    assert workers["depends_on"]["db-grants"]["condition"] == "service_completed_successfully"
    api = services["api"]
    assert api["command"] == ["api"]
    assert "chargeline_runtime" in api["environment"]["CHARGELINE_DATABASE_URL"]
    assert api["depends_on"]["db-grants"]["condition"] == "service_completed_successfully"


def test_compose_mounts_files_that_exist() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).resolve().exists(), f"{name} mounts missing {source}"
    build = compose()["services"]["workers"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


def _docker_compose_works() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, timeout=30, check=False
    )
    return probe.returncode == 0


def test_docker_compose_config_is_valid() -> None:
    if not _docker_compose_works():
        pytest.skip("`docker compose` (the Compose v2 plugin) is not installed")
    done = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


# --- Kubernetes ------------------------------------------------------------------------------


def k8s_documents() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in load_yaml(path)]


def test_a_deployment_per_worker_kind_with_probes_resources_and_scraping() -> None:
    deployments = {
        doc["metadata"]["name"]: doc
        for doc in k8s_documents()
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] != "chargeline-api"
    }
    kinds = set()
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        assert container["args"][0] == "worker", name
        (kind,) = container["args"][1:]
        kinds.add(kind)
        assert name == f"chargeline-{kind}"
        assert container["image"] == "chargeline:local"  # kustomization.yaml sets the real one
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert {port["containerPort"] for port in container["ports"]} == {9464}
        assert container["resources"]["requests"]["memory"]
        assert container["resources"]["limits"]["memory"]
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == "9464"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["terminationGracePeriodSeconds"] > Settings().shutdown_timeout_s
        sources = {
            ref.get("configMapRef", ref.get("secretRef", {}))["name"]
            for ref in container["envFrom"]
        }
        assert sources == {"chargeline-config", "chargeline-secrets"}
    # Every kind of the contract and every kind the code offers has a Deployment.
    assert kinds == SPEC_WORKER_KINDS | (set(WORKER_KINDS) - {"all"})


def test_the_api_runs_non_root_with_probes_on_its_own_port_behind_a_service() -> None:
    documents = k8s_documents()
    (deployment,) = [d for d in documents if d.get("metadata", {}).get("name") == "chargeline-api"
                     and d["kind"] == "Deployment"]  # fmt: skip
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["api"]
    assert {port["containerPort"] for port in container["ports"]} == {Settings().api_port}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("startupProbe", "/healthz")):  # fmt: skip
        assert container[probe]["httpGet"]["path"] == path
    assert container["resources"]["limits"]["memory"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(Settings().api_port)
    (service,) = [d for d in documents if d["kind"] == "Service"
                  and d.get("metadata", {}).get("name") == "chargeline-api"]  # fmt: skip
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


def test_kustomization_lists_files_that_exist_and_names_resolve() -> None:
    (kustomization,) = load_yaml(K8S / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S / resource).exists(), resource
    documents = k8s_documents()
    config_maps = {d["metadata"]["name"] for d in documents if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"] for d in documents if d["kind"] == "Secret"}
    assert config_maps == {"chargeline-config"}
    assert secrets == {"chargeline-secrets", "chargeline-migrator", "chargeline-db-admin"}
    (job,) = [d for d in documents if d["kind"] == "Job"]
    steps = [
        *job["spec"]["template"]["spec"]["initContainers"],
        *job["spec"]["template"]["spec"]["containers"],
    ]
    assert [step["name"] for step in steps] == ["sql", "roles", "migrate", "topics", "grants"]
    for step in steps:
        for ref in step.get("envFrom", []):
            name = (ref.get("configMapRef") or ref.get("secretRef"))["name"]
            assert name in config_maps | secrets, name
    (monitor,) = load_yaml(K8S / "servicemonitor.yaml")
    (service,) = load_yaml(K8S / "service.yaml")
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    # The job label becomes "chargeline", as rules.yml expects.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "chargeline"


# --- Dockerfile and scripts ------------------------------------------------------------------


def test_dockerfile_is_non_root_with_a_healthcheck_and_no_dev_extras() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^USER 10001", text, re.M)
    assert re.search(r"^HEALTHCHECK .*/healthz", text, re.M | re.S)
    assert 'ENTRYPOINT ["chargeline"]' in text
    assert 'CMD ["worker", "all"]' in text
    assert "pip install --no-compile ." in text
    assert "[dev]" not in text
    for line in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for source in line.split():
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_apply_roles_script_is_valid_sh() -> None:
    done = subprocess.run(
        ["sh", "-n", str(DEPLOY / "postgres" / "apply-roles.sh")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_healthcheck_command_is_plain_python() -> None:
    """The HEALTHCHECK runs with the image's python alone (no curl in slim images)."""
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"]
    compile(command[2], "<healthcheck>", "exec")
