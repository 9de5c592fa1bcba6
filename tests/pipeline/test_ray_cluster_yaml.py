"""ray_cluster.yaml passes the cluster launcher's own preparation and schema validation."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.helpers import REPO


@pytest.fixture(scope="module")
def raw_config() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def test_cluster_config_validates_like_ray_up_does(raw_config):
    config = prepare_config(copy.deepcopy(raw_config))  # what `ray up` does before launching
    validate_config(config)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head runs no work
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])
    workers = [t for name, t in config["available_node_types"].items()
               if name != config["head_node_type"]]
    assert len(workers) == 1 and workers[0]["resources"]["GPU"] == 1
    assert workers[0]["min_workers"] == 0 and workers[0]["max_workers"] >= 2  # autoscaling
    assert workers[0]["node_config"]["InstanceType"].startswith(("g5.", "g6.", "g6e.", "p4"))
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert any("pip install" in c and "llava-flexattn" in c for c in config["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in c for c in
               config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:])


def test_the_validator_rejects_a_broken_variant(raw_config):
    broken = copy.deepcopy(raw_config)
    broken["available_node_types"]["gpu_worker"]["gpus"] = 1  # not a field the schema knows
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
