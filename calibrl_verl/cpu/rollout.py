"""The ``hf`` rollout for verl 0.9.1: a replica that launches :class:`HFRolloutServer` and its weight-sync adapter.

verl splits a rollout backend in two (``verl/workers/rollout/replica.py`` and ``base.py``):

* the **replica** (TaskRunner process) launches the server actor(s) and hands verl's load balancer a
  handle; the agent loop then calls ``server.generate`` directly;
* the **server adapter** (``BaseRollout``, inside each actor worker) receives the trainer's weights in
  ``update_weights`` after every step and forwards them to the server.

Both are registered under the name ``hf`` by :func:`calibrl_verl.cpu.seams.register_hf_rollout`.
One server per replica; the adapter of rollout rank 0 of each replica pushes the weights, every rank
consumes the generator (FSDP's ``full_tensor`` is a collective).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import ray
import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica

from calibrl_verl.cpu.hf_server import HFRolloutServer

logger = logging.getLogger(__name__)

SERVER_PREFIX = "hf_server"


def server_actor_name(replica_rank: int, role: str = "", suffix: str = "") -> str:
    """Ray actor name shared by the replica (creates it) and the adapter (looks it up); role: "", reward_..."""
    return f"{SERVER_PREFIX}_{role}{replica_rank}_0{suffix}"


def rollout_world_size(config: Any) -> int:
    """Ranks per replica: tp * dp * pp, as verl computes it."""
    return config.tensor_model_parallel_size * config.data_parallel_size * config.pipeline_model_parallel_size


class HFReplica(RolloutReplica):
    """One :class:`HFRolloutServer` Ray actor per replica, placed on the node of the replica's first worker."""

    async def launch_servers(self) -> None:
        """Start the server actor, wait until the model is loaded, and publish its handle/address to verl."""
        role = "reward_" if self.is_reward_model else "teacher_" if self.is_teacher_model else ""
        name = server_actor_name(self.replica_rank, role, self.name_suffix)
        options: dict[str, Any] = {"name": name, "max_concurrency": self.max_concurrency}
        if self.workers:
            node_id = await self.workers[0].__ray_call__.remote(lambda _self: ray.get_runtime_context().get_node_id())
            options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=True
            )
        server = (
            ray.remote(HFRolloutServer)
            .options(**options)
            .remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        )
        await server.set_global_steps.remote(None)  # returns once __init__ (model load) finished
        # verl 0.9.1 contract (replica.py, as vLLMReplica does): lifecycle calls fan out over `servers`;
        # LLMServerManager hands `_server_handle` to the load balancer, keyed by `_server_address`.
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"ray://{name}"  # unique key only; this server has no HTTP endpoint


class HFServerAdapter(BaseRollout):
    """Weight-sync side of the ``hf`` rollout, built by verl's actor worker via ``get_rollout_class``."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any = None, replica_rank: int = -1) -> None:
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))  # verl 0.9.1: set per actor worker, as vLLM's adapter reads it
        world = rollout_world_size(self.config)
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        # verl 0.9.1: CheckpointEngineWorker reads `replica_rank` / `is_leader_rank` from its adapter
        self.is_leader_rank = rank % world == 0
        self._server: Any = None

    def _server_handle(self) -> Any:
        """Look the server up lazily: verl builds adapters before the replica launches the servers."""
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        """No-op: the CPU server never releases weights or caches."""

    async def release(self) -> None:
        """No-op: the CPU server never releases weights or caches."""

    async def update_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        wire_format: str = "named_tensors",
        **kwargs: Any,
    ) -> None:
        """Push the trainer's full weights to the server (the leader rank does; every rank drains the generator).

        verl calls this after each step with ``peft_config``/``base_sync_done``/``global_steps`` kwargs.
        """
        if wire_format != "named_tensors":
            raise NotImplementedError(f"hf rollout supports wire_format='named_tensors' only, got {wire_format!r}")
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError("hf rollout: LoRA adapter sync is not supported (merge LoRA instead)")
        named = {name: tensor.detach().to("cpu").contiguous() for name, tensor in weights}
        if self.is_leader_rank:
            loaded = await self._server_handle().update_weights.remote(named, global_steps=kwargs.get("global_steps"))
            logger.info("hf rollout: pushed %d/%d tensors to replica %d", loaded, len(named), self.replica_rank)
