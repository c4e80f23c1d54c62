"""deploy/ files: they parse, ask for GPUs, run the kvpipe image, and their kvpipe commands parse."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from kvpipe.cli.check import check_command
from kvpipe.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def load_all(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def image_of_dockerfile() -> str:
    text = (DEPLOY / "Dockerfile").read_text()
    m = re.search(r"-t (\S+) \.", text)
    assert m, "the Dockerfile says how to build and tag the image"
    return m.group(1)


def test_dockerfile_installs_kvpipe_with_pinned_ray():
    text = (DEPLOY / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and "rayproject/ray:${RAY_VERSION}" in froms[0]
    ray_version = re.search(r"ARG RAY_VERSION=(\S+)", text).group(1)
    pins = dict(l.split("==") for l in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in l and not l.startswith("#"))
    assert pins["ray"] == ray_version, "the image's Ray must be the version kvpipe pins"
    run = " ".join(re.findall(r"^RUN (.+?)(?<!\\)$", text.replace("\\\n", " "), re.M | re.S))
    assert "pip install" in run and "-c constraints.txt" in run and '".[ray,s3]"' in run
    assert "kvpipe --help" in run  # the entry point works in the image
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    for src in ("pyproject.toml", "constraints.txt", *folders):  # every source folder the install needs
        assert re.search(rf"^COPY .*\b{re.escape(src)}\b", text, re.M), src
        assert (ROOT / src).exists()


def test_kuberay_cluster_has_a_gpu_worker_group_on_the_kvpipe_image():
    docs = load_all("kuberay-raycluster.yaml")
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    assert cluster["apiVersion"].startswith("ray.io/")
    assert cluster["spec"]["rayVersion"] == re.search(r"ARG RAY_VERSION=(\S+)",
                                                      (DEPLOY / "Dockerfile").read_text()).group(1)
    image = image_of_dockerfile()
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == image
    groups = cluster["spec"]["workerGroupSpecs"]
    gpu = [g for g in groups if any(
        int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in g["template"]["spec"]["containers"])]
    assert gpu, "a worker group must request GPUs"
    for g in gpu:
        assert g["rayStartParams"].get("num-gpus") == "1"
        assert g["maxReplicas"] >= g["replicas"] >= g["minReplicas"] >= 0
        c = g["template"]["spec"]["containers"][0]
        assert c["image"] == image
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/data" in mounts, "workers and driver share /data for stores and datasets"
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    volumes = cluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    claim = next(v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v)
    assert claim in claims
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_rayjob_runs_a_valid_kvpipe_ray_extraction_on_the_cluster():
    job = load_all("kuberay-rayjob.yaml")[0]
    assert job["kind"] == "RayJob"
    cluster = next(d for d in load_all("kuberay-raycluster.yaml") if d["kind"] == "RayCluster")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    args = shlex.split(job["spec"]["entrypoint"])
    assert check_command(args) == "extract"
    assert args[args.index("--executor") + 1] == "ray"
    assert args[args.index("--out") + 1].startswith("/data/")


def test_ray_up_config_has_gpu_workers_and_the_kvpipe_image():
    cfg = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, key
    assert cfg["docker"]["image"] == image_of_dockerfile()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [n for n, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types and all(types[n]["max_workers"] >= 1 for n in gpu_types)
    assert cfg["max_workers"] >= sum(types[n]["max_workers"] for n in gpu_types)
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])


def deploy_doc_commands() -> list[list[str]]:
    """Every kvpipe command line of docs/DEPLOY.md's shell blocks (after `ray job submit ... --`)."""
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            words = shlex.split(cmd, comments=True)
            if "--" in words and words[:3] == ["ray", "job", "submit"]:
                words = words[words.index("--") + 1:]
            if words[:1] == ["kvpipe"]:
                out.append(words)
    return out


def test_deploy_doc_commands_are_valid_kvpipe_commands():
    cmds = deploy_doc_commands()
    names = [check_command(c) for c in cmds]
    assert names.count("extract") >= 2 and "status" in names and "verify" in names
    repair = [c for c in cmds if "--repair" in c]
    assert repair and all("--executor" in c for c in repair)


def test_check_command_refuses_typos():
    with pytest.raises(UsageError, match="No such option"):
        check_command("kvpipe extract --model m --dataset d --out o --executr ray")
    with pytest.raises(UsageError, match="No such command"):
        check_command("kvpipe extrakt")
