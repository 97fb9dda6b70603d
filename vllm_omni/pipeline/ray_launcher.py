"""Stage replicas as Ray actors: a pipeline across the machines of a Ray cluster (``launcher="ray"``).

Each replica is an actor (:class:`StageActor`) that asks the cluster for the resources its stage's config
names (``resources``; else a CPU per core of ``cpus`` and a GPU per id of ``devices``). An ``ar`` stage
with tensor or pipeline parallelism gets a placement group, a bundle per worker; its actor runs in the
group, so vLLM's own Ray executor places the workers there. The actor runs the same engine and stage loop
as a local stage process (``stage_process.start_engine`` / ``serve``) in a thread of its own.

Messages: the manager's go through an actor method (``deliver``, numbered: a threaded actor runs calls out
of order), the stage's come back through a call the manager's side keeps open (``take``) and land in the
manager's queue. Large tensors travel in Ray's object store (``ObjectStoreCodec``). A replica is alive
until its loop ends or its actor dies: the open call fails at once when Ray learns of it (a killed actor,
a lost node once Ray's node health check gives up on it: see ``docs/features/omni_pipelines.md``), and
the replica's requests fail with it. An actor that no node can hold, or that the cluster does not place
within ``placement_timeout``, fails the start with what it asked and what the cluster has. ``stop`` kills
the actor and removes its placement group.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from itertools import count
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from vllm_omni.config.stage import OmniStageConfig, parse_cpu_list
from vllm_omni.pipeline.kinds import get_stage_kind
from vllm_omni.pipeline.kinds.base import StageKind
from vllm_omni.pipeline.launcher import stage_environment
from vllm_omni.pipeline.object_store_io import ObjectStoreCodec
from vllm_omni.pipeline.running_stages import OmniStageError
from vllm_omni.pipeline.stage_process import pin_cpus, serve, start_engine

PLACEMENT_TIMEOUT_SECONDS = 60.0
"""How long a replica's actor may wait for its resources before the pipeline's start fails."""
TAKE_SECONDS = 1.0
"""How long one ``take`` call waits for the stage's next message."""
ACTOR_CONCURRENCY = 4
"""Concurrent calls a stage actor serves: ``take``, ``deliver`` and ``node`` while the loop runs."""
ENGINE_ARG_KEYS = ("tensor_parallel_size", "pipeline_parallel_size")


class RayLauncher:
    """One Ray actor per stage replica, on the cluster at ``address`` (``None``: the one ``ray.init()``
    finds, e.g. started by ``ray start`` on this machine, or a new local one). Reuses a connection this
    process already made."""

    def __init__(self, address: str | None = None, placement_timeout: float = PLACEMENT_TIMEOUT_SECONDS):
        self.address, self.placement_timeout = address, placement_timeout

    def codec(self, threshold: int) -> ObjectStoreCodec:
        return ObjectStoreCodec(threshold)

    def launch(
        self, config: OmniStageConfig, tag: int, received: queue.Queue, codec: ObjectStoreCodec
    ) -> RayStage:
        if not ray.is_initialized():
            ray.init(address=self.address, log_to_driver=True)
        options, bundles = actor_options(config)
        asked = _describe({**_named(options), **options.get("resources", {})}, bundles)
        _check_feasible(config, {**_named(options), **options.get("resources", {})}, bundles, asked)
        group = None
        if bundles:  # vLLM's Ray executor places the workers in the actor's group
            engine_args = {"distributed_executor_backend": "ray", **config.engine_args}
            config = dataclasses.replace(config, engine_args=engine_args)
            group = placement_group(bundles)
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
            )
        actor = _actor_class().options(**options).remote(config, get_stage_kind(config.engine_type), codec)
        return RayStage(actor, group, tag, received, asked, self.placement_timeout)


def actor_options(config: OmniStageConfig) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """A replica's actor options (``num_cpus``, ``num_gpus``, ``memory``, custom ``resources``, its
    environment) and, for an ``ar`` stage with tensor or pipeline parallelism, its placement group's
    bundles (one per worker, the actor's own CPU in the first); the stage's ``resources`` win."""
    asked = dict(config.resources or {})
    named = {key: asked.pop(key) for key in ("num_cpus", "num_gpus", "memory") if key in asked}
    options: dict[str, Any] = {
        "num_cpus": len(parse_cpu_list(config.cpus)) if config.cpus is not None else 1,
        "num_gpus": len(config.devices.split(",")) if config.devices is not None else 0,
        **named,
        "max_concurrency": ACTOR_CONCURRENCY,
        "runtime_env": {"env_vars": stage_environment(config, devices=False)},
    }
    if asked:
        options["resources"] = asked
    world = 1
    if config.engine_type == "ar":
        for key in ENGINE_ARG_KEYS:
            world *= int(config.engine_args.get(key, 1))
    if world == 1:
        return options, []
    device = "GPU" if options["num_gpus"] else "CPU"  # what vLLM's Ray executor asks of each bundle
    bundles = [{device: 1.0} for _ in range(world)]
    bundles[0]["CPU"] = bundles[0].get("CPU", 0.0) + options["num_cpus"]
    options["num_gpus"] = 0  # the workers hold the devices
    return options, bundles


class StageActor:
    """One stage replica in a Ray actor: engine and stage loop in a thread, the manager's messages in
    (``deliver``), the stage's out (``take``)."""

    def __init__(self, config: OmniStageConfig, kind: StageKind, codec: ObjectStoreCodec) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self._next, self._early, self._lock = 0, {}, threading.Lock()
        threading.Thread(target=self._run, args=(config, kind, codec), daemon=True, name="omni-stage").start()

    def node(self) -> str:
        """The address and Ray node id (its start, as ``ray list nodes`` shows it) of the node the actor
        runs on (answered once the actor is placed): machines may share an address."""
        return f"{ray.util.get_node_ip_address()} (node {ray.get_runtime_context().get_node_id()[:8]})"

    def deliver(self, serial: int, data: Any) -> None:
        """The manager's message number ``serial``; the loop gets them in order."""
        with self._lock:
            self._early[serial] = data
            while self._next in self._early:
                self.inbox.put((None, self._early.pop(self._next)))
                self._next += 1

    def take(self, timeout: float) -> list[Any]:
        """The stage's messages so far, waiting up to ``timeout`` for the first; None last once it ended."""
        try:
            messages = [self.outbox.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self.outbox.empty():
            messages.append(self.outbox.get_nowait())
        return messages

    def send(self, data: Any) -> None:  # the stage loop's connection (stage_process.Sender)
        self.outbox.put(data)

    def _run(self, config: OmniStageConfig, kind: StageKind, codec: ObjectStoreCodec) -> None:
        try:
            pin_cpus(config)
            engine = start_engine(config, kind, self, codec)
            if engine is not None:
                serve(config, engine, self.inbox, self, codec)
        finally:
            self.outbox.put(None)


@functools.cache
def _actor_class() -> Any:
    return ray.remote(StageActor)


class RayStage:
    """A stage replica in a Ray actor, as the manager sees it."""

    def __init__(
        self,
        actor: Any,
        group: PlacementGroup | None,
        tag: int,
        received: queue.Queue,
        asked: str,
        placement_timeout: float,
    ) -> None:
        self.actor, self.group, self.asked = actor, group, asked
        self.where = "its Ray actor (not placed yet)"
        self._why: str | None = None
        self._ended = threading.Event()
        self._serial, self._sending = count(), threading.Lock()
        self._taker = threading.Thread(
            target=self._take, args=(tag, received, placement_timeout), daemon=True, name="omni-ray-take"
        )
        self._taker.start()

    def send(self, data: Any) -> None:
        with self._sending:  # numbered in the order sent
            if not self._ended.is_set():
                self.actor.deliver.remote(next(self._serial), data)

    def is_alive(self) -> bool:
        return not self._ended.is_set()

    def exit_description(self) -> str:
        self._ended.wait(TAKE_SECONDS * 2)
        return self._why or "closed its connection while running"

    def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the stage loop to end, then kill the actor, remove its placement
        group."""
        self._ended.wait(timeout)
        ray.kill(self.actor)
        if self.group is not None:
            remove_placement_group(self.group)
        self._taker.join(timeout=TAKE_SECONDS * 2)

    def _take(self, tag: int, received: queue.Queue, placement_timeout: float) -> None:
        try:
            node = ray.get(self.actor.node.remote(), timeout=placement_timeout)
            self.where = f"its Ray actor on {node}"
            while True:
                for data in ray.get(self.actor.take.remote(TAKE_SECONDS)):
                    if data is None:
                        self._end(tag, received, f"ended ({self.where})")
                        return
                    received.put((tag, data))
        except ray.exceptions.GetTimeoutError:
            self._end(tag, received, f"got no resources in {placement_timeout:g} s: {self._resources()}")
        except ray.exceptions.RayError as error:
            self._end(tag, received, f"died ({self.where}): {_first_line(error)}")

    def _end(self, tag: int, received: queue.Queue, why: str) -> None:
        self._why = why
        self._ended.set()
        received.put((tag, None))

    def _resources(self) -> str:
        return f"it asks for {self.asked}; the cluster has {_cluster()}"


def _named(options: dict[str, Any]) -> dict[str, float]:
    """The CPU, GPU and memory an actor's options ask for, as Ray names those resources."""
    names = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
    return {names[key]: options[key] for key in names if options.get(key)}


def _describe(asked: dict[str, float], bundles: list[dict[str, float]]) -> str:
    return f"{asked}" + (f" in a placement group of bundles {bundles}" if bundles else "")


def _check_feasible(
    config: OmniStageConfig, asked: dict[str, float], bundles: list[dict[str, float]], described: str
) -> None:
    """Refuse at once an actor (or a bundle) that no node of the cluster could ever hold."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    for need in bundles or [asked]:
        if not any(all(node.get(key, 0) >= value for key, value in need.items()) for node in nodes):
            raise OmniStageError(
                f"{config.label}: no node of the Ray cluster can hold its actor: it asks for {described}; "
                f"the cluster has {_cluster()}"
            )


def _cluster() -> str:
    """Each live node's address with its total and free resources."""
    nodes = [node for node in ray.nodes() if node["Alive"]]
    free = ray.available_resources()
    return "; ".join(f"node {node['NodeManagerAddress']}: {_brief(node['Resources'])}" for node in nodes) + (
        f" (free in all: {_brief(free)})"
    )


def _brief(resources: dict[str, float]) -> str:
    """Resources without Ray's per-node bookkeeping entries (``node:...``, object store memory)."""
    shown = {
        k: v for k, v in sorted(resources.items()) if not k.startswith("node:") and "object_store" not in k
    }
    if "memory" in shown:
        shown["memory"] = f"{shown['memory'] / (1 << 30):.1f} GiB"
    return str({k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in shown.items()})


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
