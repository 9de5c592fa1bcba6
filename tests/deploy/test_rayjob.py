"""deploy/kuberay/rayjob.yaml: a KubeRay `ray.io/v1` RayJob whose fields are the operator's,
whose entrypoint parses with the caption job's own parser, whose image carries the Ray version
pyproject.toml pins, whose runtime env ships the project, and which names no secret value.

The field names below are those of KubeRay's v1 API types (RayJobSpec, RayClusterSpec,
HeadGroupSpec, WorkerGroupSpec, AutoscalerOptions, SubmitterConfig): each check runs on the
manifest and on a broken copy, which must fail it.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib

import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

from jobs.caption_remote_sensing import build_parser, parse_config
from tests.helpers import REPO

MANIFEST = REPO / "deploy" / "kuberay" / "rayjob.yaml"

RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
    "schedule"}
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                   "autoscalerOptions", "headServiceAnnotations", "suspend"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts",
                "rayStartParams", "template", "scaleStrategy"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts",
                      "securityContext", "idleTimeoutSeconds", "upscalingMode"}
SUBMITTER_CONFIG = {"backoffLimit"}
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE",
                         re.IGNORECASE)
SECRET_TEXT = [re.compile(p) for p in (
    r"AKIA[0-9A-Z]{16}", r"ASIA[0-9A-Z]{16}", r"-----BEGIN", r"\"private_key\"",
    r"ya29\.[0-9A-Za-z_-]+", r"AIza[0-9A-Za-z_-]{35}", r"hf_[A-Za-z]{30,}")]


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def pinned_ray() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    [ray_dep] = [d for d in deps if re.match(r"ray\[", d)]
    match = re.fullmatch(r"ray\[[a-z,]+\]==([0-9.]+)", ray_dep)
    assert match, f"Ray is not pinned to one version in pyproject.toml: {ray_dep!r}"
    return match.group(1)


def _unknown(fields: dict, known: set[str], where: str) -> list[str]:
    return [f"{where}.{k} is not a field of the RayJob API" for k in sorted(set(fields) - known)]


def _containers(manifest: dict) -> list[tuple[str, dict]]:
    cluster = manifest["spec"]["rayClusterSpec"]
    groups = [("head", cluster["headGroupSpec"])] + [
        (g.get("groupName", "?"), g) for g in cluster.get("workerGroupSpecs", [])]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def structure_problems(manifest: dict) -> list[str]:
    """What in the manifest the RayJob API or this project's deployment would reject."""
    bad: list[str] = []
    if (manifest.get("apiVersion"), manifest.get("kind")) != ("ray.io/v1", "RayJob"):
        bad.append("not a ray.io/v1 RayJob")
    spec = manifest["spec"]
    bad += _unknown(spec, RAYJOB_SPEC, "spec")
    bad += _unknown(spec.get("submitterConfig", {}), SUBMITTER_CONFIG, "spec.submitterConfig")
    if not isinstance(spec.get("entrypoint"), str) or not isinstance(
            spec.get("runtimeEnvYAML"), str):
        bad.append("entrypoint and runtimeEnvYAML must be strings")
    if spec.get("shutdownAfterJobFinishes") is not True:
        bad.append("shutdownAfterJobFinishes must be true")
    for name in ("ttlSecondsAfterFinished", "backoffLimit", "activeDeadlineSeconds"):
        value = spec.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            bad.append(f"spec.{name} must be a positive integer, got {value!r}")
    cluster = spec["rayClusterSpec"]
    bad += _unknown(cluster, RAYCLUSTER_SPEC, "rayClusterSpec")
    bad += _unknown(cluster.get("autoscalerOptions", {}), AUTOSCALER_OPTIONS, "autoscalerOptions")
    if cluster.get("enableInTreeAutoscaling") is not True:
        bad.append("enableInTreeAutoscaling must be true")
    head = cluster["headGroupSpec"]
    bad += _unknown(head, HEAD_GROUP, "headGroupSpec")
    if head["rayStartParams"].get("num-cpus") != "0":
        bad.append("the head must run no tasks (rayStartParams num-cpus '0')")
    workers = cluster.get("workerGroupSpecs") or []
    if len(workers) != 1:
        bad.append(f"expected one worker group, got {len(workers)}")
    for group in workers:
        bad += _unknown(group, WORKER_GROUP, f"workerGroupSpecs[{group.get('groupName')}]")
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not (isinstance(low, int) and isinstance(high, int) and 0 <= low < high and high >= 2
                and low <= group.get("replicas", low) <= high):
            bad.append(f"worker group replicas must autoscale: min {low}, max {high}")
    for group in [head, *workers]:
        params = group.get("rayStartParams")
        if not isinstance(params, dict) or any(not isinstance(v, str) for v in params.values()):
            bad.append("rayStartParams must be a map of strings")
        if not group["template"]["spec"].get("serviceAccountName"):
            bad.append("every pod needs the service account that holds the storage access")
    for name, container in _containers(manifest):
        resources = container.get("resources", {})
        gpus = [resources.get(k, {}).get("nvidia.com/gpu") for k in ("requests", "limits")]
        if name == "head" and any(gpus):
            bad.append("the head asks for a GPU")
        if name != "head" and gpus != [1, 1]:
            bad.append(f"{name}: each worker needs nvidia.com/gpu: 1, got {gpus}")
    return bad


def _walk(node, path="$"):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def secret_problems(manifest: dict, text: str) -> list[str]:
    """Secret values in the manifest: env entries of secret-like names with a literal value,
    envFrom that is not a Secret / ConfigMap by name, Secret objects, key-shaped strings."""
    bad = []
    for path, node in _walk(manifest):
        if not isinstance(node, dict):
            continue
        if "name" in node and ("value" in node or "valueFrom" in node) \
                and SECRET_NAME.search(str(node["name"])):
            ref = node.get("valueFrom", {}).get("secretKeyRef", {})
            if "value" in node or not ref.get("name"):
                bad.append(f"{path}: {node['name']} must come from a Secret by name")
        for source in node.get("envFrom", []) if isinstance(node.get("envFrom"), list) else []:
            ref = source.get("secretRef") or source.get("configMapRef") or {}
            if set(ref) - {"name", "optional"} or not ref.get("name"):
                bad.append(f"{path}.envFrom: only Secrets / ConfigMaps by name")
        if node.get("kind") == "Secret" or {"data", "stringData"} & set(node):
            bad.append(f"{path}: holds secret data")
    runtime_env = yaml.safe_load(manifest["spec"].get("runtimeEnvYAML") or "{}")
    for name in (runtime_env.get("env_vars") or {}):
        if SECRET_NAME.search(name):
            bad.append(f"runtimeEnvYAML env_vars.{name}: a secret in the job's runtime env")
    bad += [f"text matches {p.pattern}" for p in SECRET_TEXT if p.search(text)]
    return bad


# --------------------------------------------------------------------------------------------
def test_manifest_uses_rayjob_fields_as_the_operator_defines_them(manifest):
    assert structure_problems(manifest) == []
    broken = copy.deepcopy(manifest)
    cluster = broken["spec"]["rayClusterSpec"]
    cluster["workerGroupSpec"] = cluster.pop("workerGroupSpecs")  # a misspelt field
    broken["spec"]["ttlSecondsAfterFinished"] = "600"
    cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    problems = structure_problems(broken)
    assert any("rayClusterSpec.workerGroupSpec is not a field" in p for p in problems)
    assert any("ttlSecondsAfterFinished" in p for p in problems)
    assert any("num-cpus" in p for p in problems)


def test_entrypoint_parses_with_the_jobs_own_parser(manifest):
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/caption_remote_sensing.py"]
    assert (REPO / argv[1]).is_file()
    args = build_parser().parse_args(argv[2:])
    config, _ = parse_config(argv[2:])  # the job's own validation (exit 2 on a bad value)
    for uri in (args.input, args.output, args.model, args.vision_tower):
        assert uri.startswith(("gs://", "s3://")), uri  # pods share no local disk
    assert config.input == args.input and config.output == args.output
    assert args.gpus_per_actor == 1.0 and args.actors == "1,8"
    with pytest.raises(SystemExit):  # and the parser does refuse what it does not know
        build_parser().parse_args([*argv[2:], "--no-such-flag"])


def test_image_and_ray_version_are_the_pinned_ray(manifest):
    version = pinned_ray()
    assert version == ray.__version__  # the venv runs what the cluster will
    image = f"rayproject/ray:{version}-py311-gpu"
    containers = _containers(manifest)
    assert len(containers) == 2 and all(c["image"] == image for _, c in containers)
    assert manifest["spec"]["rayClusterSpec"]["rayVersion"] == version
    launcher = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    assert launcher["docker"]["image"] == image


def test_runtime_env_ships_the_project(manifest):
    env = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)  # Ray's own validation of the fields and their types
    assert re.fullmatch(r"https://\S+\.zip", env["working_dir"])
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [d for d in project["dependencies"] if not d.startswith("ray[")]
    wanted += project["optional-dependencies"]["gs"]
    assert sorted(env["pip"]) == sorted(wanted)  # pyproject's pins, Ray left to the image
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def test_no_secret_value_only_names(manifest):
    text = MANIFEST.read_text()
    assert secret_problems(manifest, text) == []
    pods = [g["template"]["spec"] for g in [manifest["spec"]["rayClusterSpec"]["headGroupSpec"],
                                            *manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]]]
    assert {p["serviceAccountName"] for p in pods} == {"llava-flexattn"}
    refs = {s["secretRef"]["name"] for _, c in _containers(manifest) for s in c["envFrom"]}
    assert refs == {"llava-flexattn-storage"}

    leaky = copy.deepcopy(manifest)
    _, worker = _containers(leaky)[1]
    worker["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI/K7MDENG"}]
    assert any("AWS_SECRET_ACCESS_KEY" in p for p in secret_problems(leaky, text))
    worker["env"] = [{"name": "AWS_SECRET_ACCESS_KEY",
                      "valueFrom": {"secretKeyRef": {"name": "s3", "key": "secret"}}}]
    assert secret_problems(leaky, text) == []
    assert secret_problems(manifest, text + "\n# AKIAIOSFODNN7EXAMPLE\n")
