"""The Ray launcher on a two-node local cluster (Ray's own ``cluster_utils.Cluster``): stages pinned to
nodes, tensors through the object store, a killed actor, start-up without resources, shutdown."""

from __future__ import annotations

import time

import pytest
import torch

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

import vllm_omni.testing.echo_stage  # noqa: E402,F401  (registers the echo kind)
from vllm_omni import OmniLLM, OmniStageConfig  # noqa: E402
from vllm_omni.pipeline.object_store_io import ObjectStoreCodec  # noqa: E402
from vllm_omni.pipeline.ray_launcher import RayLauncher, actor_options  # noqa: E402
from vllm_omni.pipeline.stage_manager import OmniStageError  # noqa: E402

MIB = 1 << 20
NODE_MEMORY = 200 * MIB


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of one CPU each; ``first`` / ``second`` pin an actor to one."""
    made = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"first": 1},
            "object_store_memory": NODE_MEMORY,
            "include_dashboard": True,
            "dashboard_port": None,  # the state API (list_actors) asks it
        },  # fmt: skip
    )
    made.add_node(num_cpus=1, resources={"second": 1}, object_store_memory=NODE_MEMORY)
    ray.init(address=made.address, log_to_driver=False)
    yield made
    ray.shutdown()
    made.shutdown()


def echo(stage_id: int, node: str, **fields) -> OmniStageConfig:
    return OmniStageConfig(
        stage_id, "echo", "none", ["latent"], ["latent"], stage_input="echo_tensor" if stage_id else None,
        resources={node: 0.1, "num_cpus": 0.1}, **fields,
    )  # fmt: skip


def pipeline_actors() -> list:
    """Stage actors Ray still lists as alive (or starting)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "StageActor")], raise_on_missing_output=False)
    return [a for a in actors if a.state != "DEAD"]


def test_a_big_tensor_travels_as_an_object_ref_and_is_passed_on_without_a_copy(cluster):
    codec, tensor = ObjectStoreCodec(MIB), torch.randn(MIB)
    data, refs = codec.dumps({"t": tensor})
    assert len(refs) == 1 and len(data) < 1024  # the 4 MiB are in the object store
    in_manager = codec.loads((data, refs), keep=[])["t"]
    assert torch.equal(in_manager, tensor)
    again = codec.dumps({"t": in_manager})
    assert again[1] == refs  # passed on by its ref: nothing put again
    assert torch.equal(codec.loads(again)["t"], tensor)
    small = codec.dumps({"t": torch.ones(4)})
    assert small[1] == []


def test_stages_on_two_nodes_hand_off_4_mib_through_the_object_store(cluster):
    start = time.monotonic()
    omni = OmniLLM([echo(0, "first"), echo(1, "second")], launcher="ray", shm_threshold=MIB)
    started = time.monotonic() - start
    try:
        nodes = {h.where for h in omni.manager.running.handles}
        assert len(nodes) == 1 or all("Ray actor on" in n for n in nodes)
        assert isinstance(omni.manager.running.codec, ObjectStoreCodec)
        outs = omni.generate([{"nbytes": 4 * MIB}, {"nbytes": 8 * MIB}], use_tqdm=False)
        for out, size in zip(outs, (4, 8), strict=True):
            assert out.error is None and list(out.stage_outputs) == [0, 1]
            assert torch.equal(out.latents, torch.arange(size * MIB // 4, dtype=torch.float32))
            assert out.stage_outputs[1].handoff_seconds > 0
        local = OmniLLM([echo(0, "first"), echo(1, "second")], shm_threshold=MIB)
        try:
            same = local.generate([{"nbytes": 4 * MIB}], use_tqdm=False)[0]
            assert torch.equal(same.latents, outs[0].latents)
        finally:
            local.close()
    finally:
        omni.close()
    assert pipeline_actors() == []
    assert started < 30


def test_a_killed_actor_fails_its_requests_within_seconds_naming_stage_and_replica(cluster):
    stages = [echo(0, "first"), echo(1, "second", replicas=2)]
    omni = OmniLLM(stages, launcher=RayLauncher())
    try:
        assert omni.generate([{"nbytes": MIB}], use_tqdm=False)[0].error is None
        handle = omni.manager.running.handles[1]  # stage 1 replica 0
        ray.kill(handle.actor)
        start = time.monotonic()
        while handle.is_alive() and time.monotonic() - start < 5:
            time.sleep(0.05)
        assert not handle.is_alive() and time.monotonic() - start < 5
        omni.manager.poll(0.5)
        error = str(omni.manager.dead_replicas[1])
        assert error.startswith("stage 1 (echo) replica 0 died") and "Ray actor" in error, error
        out = omni.generate([{"nbytes": MIB}], use_tqdm=False)[0]  # replica 1 serves on
        assert out.error is None
    finally:
        omni.close()
    assert pipeline_actors() == []


def test_a_stage_no_node_can_hold_fails_the_start_naming_what_it_asked_and_what_there_is(cluster):
    with pytest.raises(OmniStageError, match=r"stage 1 \(echo\).*'third': 0.1.*the cluster has.*'second': 1"):
        OmniLLM([echo(0, "first"), echo(1, "third")], launcher="ray")
    assert pipeline_actors() == []


def test_a_stage_the_cluster_cannot_place_in_time_fails_the_start(cluster):
    stages = [echo(0, "first"), echo(1, "first")]
    stages[0].resources = stages[1].resources = {"first": 1, "num_cpus": 0.1}  # one of them at a time
    expected = r"stage [01] \(echo\) got no resources in 2 s: it asks for .*first.*the cluster has"
    with pytest.raises(OmniStageError, match=expected):
        OmniLLM(stages, launcher=RayLauncher(placement_timeout=2))
    assert pipeline_actors() == []


def test_tensor_parallel_ar_stages_get_a_placement_group_for_their_workers():
    stage = OmniStageConfig(0, "ar", "m", engine_args={"tensor_parallel_size": 2}, devices="0,1")
    options, bundles = actor_options(stage)
    assert bundles == [{"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0}] and options["num_gpus"] == 0
    options, bundles = actor_options(OmniStageConfig(0, "ar", "m", resources={"num_cpus": 2, "big": 1}))
    assert bundles == [] and options["num_cpus"] == 2 and options["resources"] == {"big": 1}
