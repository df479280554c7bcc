"""The monitoring stack: docker-compose.yml, the Prometheus config (promtool) and the Grafana dashboard,
whose every PromQL expression must parse and name only metrics the server really exports."""

import json
import re
import shutil
import subprocess
import urllib.request

import pytest
import yaml

from tests.deploy.conftest import ROOT

DASHBOARD = ROOT / "deploy/grafana/dashboards/ponder.json"
METRIC = re.compile(r"\b(ponder:[a-z0-9_]+|process_[a-z0-9_]+)")
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (apt-get install prometheus)")


def expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def as_plain_promql(expr: str) -> str:
    """Grafana's variables replaced by what they expand to, so Prometheus tools can parse the query."""
    return expr.replace("$__rate_interval", "1m").replace("$__range", "30m").replace("$model_name", ".*")


def test_compose_wires_ponder_prometheus_and_grafana():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"ponder", "prometheus", "grafana"}
    assert services["ponder"]["build"]["context"] == "." and "8000:8000" in services["ponder"]["ports"]
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            host = volume.split(":")[0]
            assert (ROOT / host).exists(), f"{name} mounts {host}, which does not exist"
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    job = prometheus["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["ponder:8000"]
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/ponder.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["providers"][0]["options"]["path"]


@needs_promtool
def test_prometheus_config_passes_promtool():
    result = subprocess.run(["promtool", "check", "config", str(ROOT / "deploy/prometheus.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_covers_depth_saving_latency_queue_and_kv():
    dash = json.loads(DASHBOARD.read_text())
    uid = json.loads(json.dumps(yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())))["datasources"][0]["uid"]
    assert dash["uid"] == "ponder" and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == uid and p["targets"], p["title"]
    exprs = " ".join(expressions())
    for needed in ("ponder:token_exit_depth_bucket", "ponder:core_steps_executed_total",
                   "ponder:core_steps_full_depth_total", "ponder:time_to_first_token_seconds_bucket",
                   "ponder:inter_token_latency_seconds_bucket", "ponder:num_requests_waiting",
                   "ponder:num_requests_running", "ponder:kv_cache_usage_perc"):
        assert needed in exprs, needed
    assert "histogram_quantile(0.99" in exprs


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": as_plain_promql(e)} for i, e in enumerate(expressions())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_metric_is_exported_by_the_server(entrypoint_server):
    base, _ = entrypoint_server
    req = urllib.request.Request(f"{base}/v1/completions", headers={"content-type": "application/json"},
                                 data=b'{"prompt": "Emma", "max_tokens": 4}')
    urllib.request.urlopen(req).read()  # histograms and labelled counters appear once observed
    exported = {line.split("{")[0].split(" ")[0] for line in urllib.request.urlopen(f"{base}/metrics").read()
                .decode().splitlines() if line and not line.startswith("#")}
    used = {m for e in expressions() for m in METRIC.findall(e)}
    assert used and used <= exported, sorted(used - exported)


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.mark.skipif(compose_command() is None, reason="no docker compose client (apt-get install docker-compose)")
def test_compose_file_passes_docker_compose_config():
    result = subprocess.run([*compose_command(), "-f", str(ROOT / "docker-compose.yml"), "config"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {"ponder", "prometheus", "grafana"} <= set(yaml.safe_load(result.stdout)["services"])
