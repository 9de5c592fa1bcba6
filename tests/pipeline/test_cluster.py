"""The pipeline on a simulated multi-node cluster (ray.cluster_utils.Cluster, fake GPUs)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipeline import ProcessorConfig, build_processor
from pipeline.run import JobConfig, run
from tests.helpers import noise_image

PREDICT_ACTOR = "MapWorker(MapBatches(Predictor))"
MB = 1024**2


@pytest.fixture()
def two_gpu_nodes(pipeline_env):
    """A CPU head plus two worker nodes with one (fake) GPU each; the session Ray is stopped
    first and restarted by the next test that asks for it."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 300 * MB},
    )
    workers = [
        cluster.add_node(num_cpus=1, num_gpus=1, memory=2048 * MB,
                         object_store_memory=300 * MB)
        for _ in range(2)
    ]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield [w.node_id for w in workers]
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_actors_on_both_gpu_nodes_and_complete_output(two_gpu_nodes, demo_model, tmp_path,
                                                      monkeypatch):
    from ray.data import DataContext
    from ray.util.state import list_actors, list_tasks

    # Start execution only once both replicas are up, so both are created deterministically.
    monkeypatch.setattr(DataContext.get_current(), "wait_for_min_actors_s", 120)
    (tmp_path / "in").mkdir()
    for i in range(6):
        noise_image(300 + 50 * i, 260, seed=i).save(tmp_path / "in" / f"tile{i}.png")
    config = JobConfig(
        input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(demo_model),
        actors=(2, 2), gpus_per_actor=None,  # auto: the cluster has GPUs -> 1 per actor
        batch_size=1, max_new_tokens=2, decode_rows_per_task=1, memory_per_actor_gb=0.5,
    )
    assert config.resolved_gpus_per_actor() == 1.0
    summary = run(config)

    table = pq.read_table(tmp_path / "out")
    assert sorted(table.column("id").to_pylist()) == [f"tile{i}.png" for i in range(6)]
    assert table.column("error").null_count == 6
    assert summary.rows_written == 6 and summary.errors == 0

    # Two replicas, one per GPU node; execution waited for both to load the model.
    actors = list_actors(filters=[("class_name", "=", PREDICT_ACTOR)], detail=True)
    assert len(actors) == 2 and {a.node_id for a in actors} == set(two_gpu_nodes)
    calls = list_tasks(filters=[("type", "=", "ACTOR_TASK")], detail=True, limit=10_000)
    answered_on = {t.node_id for t in calls
                   if t.name.startswith(PREDICT_ACTOR) and t.state == "FINISHED"}
    assert answered_on and answered_on <= set(two_gpu_nodes)


@pytest.mark.slow
def test_processor_concurrency_1_2_autoscales_to_both_gpu_nodes(two_gpu_nodes, demo_model):
    import io

    import ray
    from ray.util.state import list_actors

    # enough work that the second replica starts (loads its model) while batches still wait
    items = []
    for i in range(48):
        buf = io.BytesIO()
        noise_image(200 + 10 * i, 180, seed=i).save(buf, format="PNG")
        items.append({"id": f"t{i:02d}", "image": buf.getvalue()})
    config = ProcessorConfig(model=str(demo_model), concurrency=(1, 2), gpus_per_replica=1,
                             batch_size=1, max_new_tokens=24, memory_per_replica_gb=0.5,
                             decode_rows_per_task=1)
    rows = build_processor(config)(ray.data.from_items(items)).take_all()
    assert sorted(r["id"] for r in rows) == [f"t{i:02d}" for i in range(48)]
    assert all(r["error"] is None and r["answer"] is not None for r in rows)
    # It started with one replica and, with batches queued, Ray Data added the second.
    actors = list_actors(filters=[("class_name", "=", PREDICT_ACTOR)], detail=True)
    assert len(actors) == 2 and {a.node_id for a in actors} == set(two_gpu_nodes)
