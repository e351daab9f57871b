"""The compose stack, checked without a Docker engine: valid, and wired to flags and metrics that
exist.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from kvpack.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "compose" / "docker-compose.yml"
DOCKERFILES = {
    "kvstore": REPO / "services" / "kvstore" / "Dockerfile",
    "inference": REPO / "services" / "inference" / "Dockerfile",
}


def compose_config(*profiles: str) -> dict:
    binary = shutil.which("docker-compose")
    if binary is None:  # CI installs Debian's docker-compose (scripts/install-system-deps.sh)
        pytest.fail("docker-compose not installed: apt-get install docker-compose")
    args = [binary, "-f", str(COMPOSE)]
    for profile in profiles:
        args += ["--profile", profile]
    result = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def long_options(*command: str) -> set[str]:
    """Environment names of every long option of a kvpack subcommand (KVPACK_<FLAG>)."""
    parser = build_parser()
    for name in command:
        parser = next(a for a in parser._actions if hasattr(a, "choices") and a.choices
                      and name in a.choices).choices[name]
    return {"KVPACK_" + o.lstrip("-").replace("-", "_").upper()
            for a in parser._actions for o in a.option_strings if o.startswith("--")}


def dockerfile_instructions(service: str) -> list[tuple[str, str]]:
    parser = DockerfileParser(path=str(DOCKERFILES[service]))
    return [(i["instruction"], i["value"]) for i in parser.structure
            if i["instruction"] != "COMMENT"]


def test_compose_file_is_valid_with_and_without_the_gpu_profile():
    cpu = compose_config()["services"]
    gpu = compose_config("gpu")["services"]
    default = {name for name, service in cpu.items() if not service.get("profiles")}
    assert default == {"redis", "kvstore", "inference", "prometheus", "grafana"}
    assert gpu["inference-gpu"]["profiles"] == ["gpu"]
    assert gpu["inference-gpu"]["environment"]["KVPACK_DEVICE"] == "cuda"
    devices = gpu["inference-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


@pytest.mark.parametrize("service, command", [
    ("kvstore", ("kvstore", "serve")), ("inference", ("inference", "serve")),
    ("inference-gpu", ("inference", "serve"))])
def test_every_kvpack_variable_is_a_real_flag(service, command):
    environment = compose_config("gpu")["services"][service]["environment"]
    names = {name for name in environment if name.startswith("KVPACK_")}
    assert names and names <= long_options(*command), names - long_options(*command)


def test_redis_is_configured_as_a_cache():
    command = " ".join(compose_config()["services"]["redis"]["command"])
    assert "--maxmemory-policy allkeys-lru" in command and "--appendonly no" in command
    assert re.search(r"--maxmemory \S+", command)


def test_prometheus_scrapes_the_metrics_ports_the_services_open():
    services = compose_config("gpu")["services"]
    scrape = yaml.safe_load((REPO / "deploy/compose/prometheus/prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]}
    for name in ("kvstore", "inference", "inference-gpu"):
        assert f"{name}:{services[name]['environment']['KVPACK_METRICS_PORT']}" in targets


def test_dashboards_use_the_provisioned_datasource_and_only_exported_metrics():
    datasource = yaml.safe_load(
        (REPO / "deploy/compose/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    dashboard = json.loads((REPO / "deploy/compose/grafana/dashboards/kvpack.json").read_text())
    exported = set()
    for module in ("kvpack.kvstore.metrics", "kvpack.inference.metrics"):
        source = Path(sys.modules[module].__file__ if module in sys.modules
                      else __import__(module, fromlist=["x"]).__file__).read_text()
        exported |= set(re.findall(r'"(kvpack_[a-z_]+)"', source))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid
        for target in panel["targets"]:
            for metric in re.findall(r"kvpack_[a-z_]+", target["expr"]):
                base = re.sub(r"_(total|bucket|count|sum)$", "", metric)
                assert base in exported, f"panel {panel['title']!r} queries unknown {metric}"


@pytest.mark.parametrize("service", DOCKERFILES)
def test_dockerfiles_parse_copy_existing_paths_and_run_real_commands(service):
    instructions = dockerfile_instructions(service)
    assert instructions[0][0] == "FROM"
    for instruction, value in instructions:
        if instruction == "COPY":
            *sources, _ = value.split()
            for source in sources:
                assert (REPO / source).exists(), f"{service} Dockerfile copies missing {source}"
    command = json.loads(next(v for i, v in instructions if i == "CMD"))
    assert command[0] == "kvpack"
    result = subprocess.run([sys.executable, "-m", "kvpack", *command[1:], "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    healthcheck = next(v for i, v in instructions if i == "HEALTHCHECK")
    assert "kvpack.common.healthcheck" in healthcheck


def test_kvstore_image_installs_no_torch():
    installs = [value for instruction, value in dockerfile_instructions("kvstore")
                if instruction == "RUN"]
    assert installs and all("torch" not in line and "[inference]" not in line for line in installs)
    result = subprocess.run(  # and the kvstore CLI really works without torch importable
        [sys.executable, "-c",
         "import sys; sys.modules['torch'] = None; sys.modules['triton'] = None;"
         "from kvpack.cli import main; main(['kvstore', 'serve', '--help'])"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
