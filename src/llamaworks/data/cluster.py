"""The same pipelines beyond one machine, on a Dask cluster (`llamaworks data run --cluster`).

Why Dask (dask.distributed): it is pure Python and light (no JVM or object store, a
`pip install 'llamaworks[cluster]'`), a `LocalCluster` runs the real scheduler and workers
in a test, and the same client code reaches clusters deployed on Slurm/PBS
(dask-jobqueue), Kubernetes (dask-kubernetes) or plain SSH hosts (`dask ssh`). The
executor's unit of work, one shard, maps onto one `client.submit`; its output files and
completion markers live on the filesystem the client and every worker share, so a killed
run resumes exactly as a local one does. Ray would also fit, but brings a heavy runtime
for what is a list of independent file-to-file tasks.

Parallel stages run shard by shard on the workers; a global stage (cross-document dedup)
runs as one task on one worker, streaming its shards in order (its state spills to disk
under OUTPUT/.state, so that worker needs no more memory than a local run), or, with
`dedup_partitions`, as index / reduce / merge / filter tasks spread over every worker
(data/dedup_partitioned.py).
"""

from __future__ import annotations

import os
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

from llamaworks.data import storage
from llamaworks.data.executor import Executor, RunPlan, run_global_stage


def _shard_task(run: RunPlan, s: int, shard: int, path: str) -> dict:
    return run.run_shard(s, shard, storage.as_path(path))


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise ValueError("--cluster needs Dask: pip install 'llamaworks[cluster]' (dask[distributed])") from None
    return distributed


def dashboard_line(client) -> str:
    """Where to watch the run's tasks, workers and memory: the scheduler's dashboard, or why there is none."""
    services = client.scheduler_info().get("services", {})
    if "dashboard" not in services:
        return ("Dask dashboard: not served (the scheduler has no dashboard; pip install 'bokeh>=3.1' where "
                "the scheduler runs)")
    link = client.dashboard_link
    try:
        import bokeh  # noqa: F401  (the dashboard's plots; without it the scheduler serves only its info pages)
    except ImportError:
        return (f"Dask dashboard: {link} (its plots need bokeh>=3.1 where the scheduler runs; workers and tasks: "
                f"{link.rsplit('/', 1)[0]}/info/main/workers.html)")
    return f"Dask dashboard: {link}"


@contextmanager
def _without_malloc_trim():
    """Start local workers without MALLOC_TRIM_THRESHOLD_, which Dask's nanny sets (65536, to hand
    freed memory back to the OS) in the worker's environment and in this process's (inherited by
    the next cluster). Setting it also fixes glibc's mmap threshold, so every large numpy temporary
    (a MinHash signature's shingles x permutations products) is mapped, faulted in and unmapped on
    each call: the same signatures measured 2-3x slower in such a worker."""
    import dask

    saved = os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            yield
    finally:
        if saved is not None:
            os.environ["MALLOC_TRIM_THRESHOLD_"] = saved


def parse_cluster(spec: str) -> tuple[str, int | str]:
    """("local", N) for "local:N", else ("address", spec) for a scheduler address like tcp://host:8786."""
    if spec.startswith("local:"):
        n = spec.removeprefix("local:")
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--cluster {spec!r}: write local:N with N >= 1 worker processes, e.g. local:4")
        return "local", int(n)
    if "://" not in spec:
        raise ValueError(f"--cluster {spec!r} is neither local:N nor a scheduler address like tcp://host:8786")
    return "address", spec


class DaskExecutor(Executor):
    """`cluster`: a scheduler address (tcp://host:8786), "local:N" (a LocalCluster of N worker
    processes for this run), or a `distributed.Client` the caller owns. OUTPUT must be on a
    filesystem that this process and every worker see at the same path."""

    def __init__(self, output: str | os.PathLike, cluster, **kwargs):
        super().__init__(output, **kwargs)
        if isinstance(cluster, str):
            parse_cluster(cluster)  # a bad spec fails before anything starts
        self.cluster = cluster
        if isinstance(self.out, Path):
            self.out = self.out.resolve()  # workers may run in another working directory
        self._client = None

    @contextmanager
    def _connect(self):
        distributed = _import_distributed()
        if not isinstance(self.cluster, str):
            yield self.cluster
            return
        kind, arg = parse_cluster(self.cluster)
        if kind == "address":
            with distributed.Client(arg) as client:
                yield client
            return
        with _without_malloc_trim(), distributed.LocalCluster(n_workers=arg, threads_per_worker=1, processes=True,
                                                             dashboard_address=":0") as cluster, \
                distributed.Client(cluster) as client:
            yield client

    def run(self, *args, **kwargs) -> dict:
        with self._connect() as client:
            print(dashboard_line(client), file=sys.stderr, flush=True)
            self._client = client
            try:
                return super().run(*args, **kwargs)
            finally:
                self._client = None

    def _map(self, run, todo):
        if not todo:
            return
        from distributed import as_completed

        client, tag = self._client, uuid.uuid4().hex[:8]
        shared = client.scatter(run, broadcast=True, hash=False)  # once per worker, not once per task
        futures = [client.submit(_shard_task, shared, s, i, p, key=f"llamaworks-{tag}-stage{s}-shard{i}",
                                 pure=False) for s, i, p in todo]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            client.cancel(futures)  # an error or an interrupted caller leaves no shard task running

    def _map_tasks(self, run, fn, args):
        if not args:
            return
        from distributed import as_completed

        client, tag = self._client, uuid.uuid4().hex[:8]
        shared = client.scatter(run, broadcast=True, hash=False)
        futures = [client.submit(fn, shared, *a, key=f"llamaworks-{tag}-{fn.__name__}-{'-'.join(map(str, a))}",
                                 pure=False) for a in args]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            client.cancel(futures)

    def _run_global(self, run, s, after_shard):
        fut = self._client.submit(run_global_stage, run, s, key=f"llamaworks-{uuid.uuid4().hex[:8]}-stage{s}",
                                  pure=False)
        try:
            ran = fut.result()
        finally:
            self._client.cancel([fut])
        for i in ran:
            after_shard(i)
