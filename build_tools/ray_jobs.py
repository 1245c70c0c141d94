"""Running `generate`, `embed` and index shards as Ray Data jobs: one vLLM engine (or FAISS) per worker actor.

Every shard is one input row and one block, so the actor pool spreads shards over workers; results
stream back to the driver as each shard finishes, and the driver writes them (workers need no
shared filesystem, only the model). On a GPU cluster each actor holds `tensor_parallel_size` GPUs;
on a CPU-only cluster each holds one CPU.

    --ray                 start a local cluster on this machine (or join the one RAY_ADDRESS names)
    --ray-address ADDR    join a running cluster, e.g. ray://head:10001 or auto on a cluster node

The driver's VLLM_*, HF_* and OMP_NUM_THREADS settings travel to the workers.
"""

import os
from collections.abc import Iterator
from typing import Any

from build_tools.embed import unbatch


def worker_env() -> dict[str, str]:
    """The vLLM / Hugging Face settings of this process, for workers to run with the same ones."""
    return {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "HF_")) or k == "OMP_NUM_THREADS"}


def connect(address: str | None) -> bool:
    """Join (or, without an address, start) a Ray cluster; True if this call started Ray here."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    return True


def default_workers(gpus_per_worker: int) -> int:
    """One worker per `gpus_per_worker` GPUs of the cluster, or one per CPU where it has no GPU (or for 0)."""
    import ray

    resources = ray.cluster_resources()
    if gpus_per_worker and resources.get("GPU", 0) >= gpus_per_worker:
        return int(resources["GPU"] // gpus_per_worker)
    return max(1, int(resources.get("CPU", 1)))


def run(
    tasks: list[dict[str, Any]],
    worker_cls: type,
    worker_kwargs: dict[str, Any],
    num_workers: int | None = None,
    cpu_only: bool = False,
) -> Iterator[dict[str, Any]]:
    """Map every task through `worker_cls(**worker_kwargs)` actors; yield result rows as shards finish.

    Ray must be connected (`connect`). Results come in completion order; each carries its shard id.
    Workers hold `tensor_parallel_size` GPUs where the cluster has them, or one CPU where it has
    none or with `cpu_only` (the index stage: FAISS on the CPU, one CPU each).
    """
    import ray
    import ray.data

    if not tasks:
        return
    tp = int(worker_kwargs.get("engine_args", {}).get("tensor_parallel_size", 1))
    has_gpus = not cpu_only and ray.cluster_resources().get("GPU", 0) >= tp
    workers = min(len(tasks), num_workers or default_workers(0 if cpu_only else tp))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the build shows its own, in tokens/s
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds = ds.map_batches(
        worker_cls,
        fn_constructor_kwargs=worker_kwargs,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
        num_gpus=tp if has_gpus else None,
        num_cpus=None if has_gpus else 1,
        runtime_env={"env_vars": worker_env()},
    )
    yield from ds.iter_rows()


class ShardRunner:
    """Runs shard tasks through a worker class: in this process, or as Ray Data jobs.

    In-process, one worker (one engine) is made on first use and kept for every later `run`, with
    `overrides` set on it as attributes; on Ray each `run` is one job whose actors get
    `worker_kwargs | overrides`.
    """

    def __init__(
        self,
        worker_cls: type,
        worker_kwargs: dict[str, Any],
        use_ray: bool,
        num_workers: int | None = None,
        cpu_only: bool = False,
    ):
        self.worker_cls, self.worker_kwargs = worker_cls, worker_kwargs
        self.use_ray, self.num_workers, self.cpu_only = use_ray, num_workers, cpu_only
        self._worker: Any = None
        # Seconds before each stage's first result (engine or Ray worker start-up), by stage name.
        self.startup_s: dict[str, float] = {}

    def run(self, tasks: list[dict[str, Any]], **overrides: Any) -> Iterator[dict[str, Any]]:
        """Result rows of `tasks`, in task order in-process and in completion order on Ray."""
        if self.use_ray:
            kwargs = {**self.worker_kwargs, **overrides}
            yield from run(tasks, self.worker_cls, kwargs, self.num_workers, self.cpu_only)
            return
        for task in tasks:
            if self._worker is None:
                self._worker = self.worker_cls(**{**self.worker_kwargs, **overrides})
            for name, value in overrides.items():
                setattr(self._worker, name, value)
            yield from unbatch(self._worker({k: [v] for k, v in task.items()}))

    def close(self) -> None:
        """Shut the in-process engine down (Ray actors end with their job)."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None
