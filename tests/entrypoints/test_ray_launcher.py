"""The Ray launcher on a two-node local cluster (Ray's own ``cluster_utils.Cluster``): stages pinned to
nodes, tensors through the object store, a killed actor, a node that vanishes, start-up without resources,
shutdown."""

from __future__ import annotations

import argparse
import os
import signal
import time

import numpy as np
import psutil
import pytest
import requests
import torch

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

import vllm_omni.testing.echo_stage  # noqa: E402,F401  (registers the echo kind)
from tests.utils import running_server  # noqa: E402
from vllm_omni import OmniLLM, OmniStageConfig, create_ar_stage_config, create_dit_stage_config  # noqa: E402
from vllm_omni.config.stage import load_pipeline_file  # noqa: E402
from vllm_omni.entrypoints.cli.serve import launcher_from_args  # noqa: E402
from vllm_omni.pipeline.object_store_io import ObjectStoreCodec  # noqa: E402
from vllm_omni.pipeline.ray_launcher import RayLauncher, actor_options  # noqa: E402
from vllm_omni.pipeline.stage_manager import OmniStageError  # noqa: E402
from vllm_omni.testing.tiny_models import tiny_model_path  # noqa: E402

MIB = 1 << 20
NODE_MEMORY = 200 * MIB
FAST_HEALTH_CHECK = {
    "health_check_period_ms": 300,
    "health_check_timeout_ms": 300,
    "health_check_failure_threshold": 5,
}
"""The head's node health check: a node that stops answering is dead within ~3 s (Ray's default: ~64 s).
Five missed checks, not three: a node of this loaded machine answering late must not count as gone."""


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of one CPU each; ``first`` / ``second`` pin an actor to one. Actors get the environment
    of their node (a small KV cache for the tiny models). The head gives up on a silent node quickly."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    made = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"first": 1},
            "object_store_memory": NODE_MEMORY,
            "include_dashboard": True,
            "dashboard_port": None,  # the state API (list_actors) asks it
            "_system_config": FAST_HEALTH_CHECK,
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


def test_a_node_that_vanishes_fails_its_requests_within_5_s_and_the_other_replica_serves_on(cluster):
    """A third node's processes freeze (a machine off the network: no socket closes, only the health check
    notices): the requests of the replica there fail naming stage, replica and node; the other serves on."""
    node = cluster.add_node(num_cpus=1, resources={"second": 1}, object_store_memory=NODE_MEMORY)
    frozen = []
    stages = [echo(0, "first"), echo(1, "second", replicas=2)]
    stages[1].resources = {"second": 0.6, "num_cpus": 0.1}  # one replica on each of two nodes
    omni = OmniLLM(stages, launcher=RayLauncher())
    try:
        assert omni.generate([{"nbytes": MIB}] * 2, use_tqdm=False)[0].error is None
        lost = [h for h in omni.manager.running.handles[1:] if node.node_id[:8] in h.where]
        assert len(lost) == 1, [h.where for h in omni.manager.running.handles]
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        frozen = [raylet, *raylet.children(recursive=True)]
        start = time.monotonic()
        for process in frozen:
            process.send_signal(signal.SIGSTOP)
        outs = omni.generate([{"nbytes": MIB}] * 4, use_tqdm=False)  # some go to the frozen replica
        detected = time.monotonic() - start
        errors = [out.error for out in outs if out.error is not None]
        print(f"a vanished node's requests failed after {detected:.2f} s: {errors[:1]}")
        assert errors and len(errors) < 4 and detected < 5, (detected, errors)
        replica = omni.manager.running.handles.index(lost[0]) - 1
        assert all(e.startswith(f"stage 1 (echo) replica {replica} died (its Ray actor on ") for e in errors)
        assert all(f"(node {node.node_id[:8]})" in e for e in errors), errors
        outs = omni.generate([{"nbytes": MIB}] * 2, use_tqdm=False)  # the other replica serves on
        assert all(out.error is None for out in outs)
    finally:
        omni.close()
        for process in frozen:
            process.send_signal(signal.SIGCONT)
        cluster.remove_node(node)
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


def test_the_launcher_comes_from_the_flag_else_the_yaml_file(tmp_path):
    path = tmp_path / "pipeline.yaml"
    stage = "{stage_id: 0, engine_type: echo, model_path: x, input_modalities: [latent], resources: {a: 1}}"
    path.write_text(f"launcher: ray\nstages:\n  - {stage}\n")
    stages, launcher = load_pipeline_file(path)
    assert launcher == "ray" and stages[0].resources == {"a": 1}
    args = argparse.Namespace(stage_config=str(path), model_tag=None, stage_launcher=None, ray_address=None)
    assert launcher_from_args(args) == "ray"
    assert launcher_from_args(argparse.Namespace(**{**vars(args), "stage_launcher": "local"})) == "local"
    remote = launcher_from_args(argparse.Namespace(**{**vars(args), "ray_address": "10.0.0.1:6379"}))
    assert isinstance(remote, RayLauncher) and remote.address == "10.0.0.1:6379"
    with pytest.raises(ValueError, match="--ray-address goes with --stage-launcher ray"):
        launcher_from_args(
            argparse.Namespace(**{**vars(args), "stage_launcher": "local", "ray_address": "x"})
        )
    path.write_text("launcher: slurm\nstages: []\n")
    with pytest.raises(ValueError, match=r"launcher must be one of \['local', 'ray'\], got 'slurm'"):
        load_pipeline_file(path)


def test_tensor_parallel_ar_stages_get_a_placement_group_for_their_workers():
    stage = OmniStageConfig(0, "ar", "m", engine_args={"tensor_parallel_size": 2}, devices="0,1")
    options, bundles = actor_options(stage)
    assert bundles == [{"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0}] and options["num_gpus"] == 0
    options, bundles = actor_options(OmniStageConfig(0, "ar", "m", resources={"num_cpus": 2, "big": 1}))
    assert bundles == [] and options["num_cpus"] == 2 and options["resources"] == {"big": 1}


@pytest.mark.engine
def test_an_ar_to_dit_pipeline_across_two_nodes_equals_the_local_one(cluster):
    """The AR stage (node 1) encodes ~300-token prompts for the DiT (node 2): hidden states of 4096 floats
    a row, over 4 MiB a request, cross through the object store."""
    ar = create_ar_stage_config(0, tiny_model_path("qwen3_wide"), ["text"], ["hidden_states"],
                                final_output=False, stage_input="chat_template",
                                prompt_hidden_states_layer=-2, dtype="float32", max_model_len=512,
                                enforce_eager=True, resources={"first": 0.1, "num_cpus": 0.1})  # fmt: skip
    dit = create_dit_stage_config(1, tiny_model_path("z_image_wide"), ["hidden_states"], ["image"],
                                  num_inference_steps=2, height=32, width=32,
                                  resources={"second": 0.1, "num_cpus": 0.1})  # fmt: skip
    prompts = [" ".join(["A beautiful landscape."] * 60), " ".join(["A red sunset over the sea."] * 30)]
    params = [{"max_tokens": 1}, {"seed": 3, "output_type": "np", "guidance_scale": 0.0}]
    results = []
    for launcher in ("local", "ray"):
        omni = OmniLLM([ar, dit], launcher=launcher, keep_stage_outputs=True)
        try:
            if launcher == "ray":
                assert isinstance(omni.manager.running.codec, ObjectStoreCodec)
            results.append(omni.generate(prompts, params, use_tqdm=False))
        finally:
            omni.close()
    for local, on_ray in zip(*results, strict=True):
        assert local.error is None and on_ray.error is None
        handed = on_ray.stage_outputs[0].outputs[0].prompt_hidden_states
        assert handed.shape[1] == 4096 and handed.nbytes >= 4 * MIB
        torch.testing.assert_close(handed, local.stage_outputs[0].outputs[0].prompt_hidden_states)
        assert np.abs(on_ray.images - local.images).max() <= 1 / 255  # another core count: another sum order
    assert pipeline_actors() == []


@pytest.mark.engine
def test_the_server_serves_images_from_ray_actors_and_leaves_none(cluster):
    flags = ("--omni", "--dit-steps", "2", "--dit-size", "32x32", "--stage-launcher", "ray")
    with running_server(tiny_model_path("sd3"), *flags, "--ray-address", cluster.address) as url:
        assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ok"
        assert len(pipeline_actors()) == 1
        body = {"prompt": "a red cube", "n": 2, "size": "32x32", "seed": 1}
        answer = requests.post(f"{url}/v1/images/generations", json=body, timeout=60)
        assert answer.status_code == 200 and len(answer.json()["data"]) == 2
    assert pipeline_actors() == []
