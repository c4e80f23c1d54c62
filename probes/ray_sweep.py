"""``kvpipe probe --executor ray``: a sweep's targets spread over Ray actors, one per GPU.

Why: a probe sweep is hundreds of independent (layer, head, kind) targets over one read-only
store; with several GPUs each takes its share. Each actor opens the store itself (read-only:
a shared filesystem or an object-store URL), builds the probe from the same ``SweepJob`` and
scores its targets with ``executor.compute_target`` -- the local executor's code -- so every
row equals the local run's. Metrics flow back to the driver, which writes the tables and plots
as a local sweep does.

Faults: actors are created with Ray's ``max_restarts`` and ``max_task_retries``, so a killed
actor process is restarted and its targets re-run there; an actor gone for good is replaced by
the driver, which resubmits its targets (bounded). Every finished target's metrics are in the
per-target cache before they are returned, and an actor answers a target it finds there from
the cache: a target finished before the kill is never computed again.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any, Iterator

from kvpipe.errors import KvpipeError, UsageError
from kvpipe.probes.base import PROBES, Probe, Target
from kvpipe.probes.device import resolve_device
from kvpipe.probes.executor import ExecutorOptions, ProbeExecutor, Scored, SweepJob, TargetCache, compute_target, \
    is_split
from kvpipe.raycluster import ActorQueue, cause, check_address, connect, import_ray, one_line

MAX_RESTARTS = 3  # Ray restarts of one actor process
MAX_TASK_RETRIES = 3  # Ray re-runs of a target whose actor died mid-call
MAX_RESUBMITS = 2  # the driver's own resubmissions of a target whose actor is gone for good
IN_FLIGHT = 2  # targets per actor: one reading while the other computes
CPU_WORKERS = 2  # actors on a cluster without GPUs, unless --workers says otherwise


class SweepActor:
    """Body of the Ray actor (wrapped with ``ray.remote`` at start). The probe is built on the
    first call, so a restarted actor rebuilds it when Ray re-runs its targets. Two calls may run
    at once: one reads the store while the other computes (one compute at a time)."""

    def __init__(self, job: SweepJob):
        self.job = job
        self.cache = TargetCache(job.cache_dir)
        self.setup_lock = threading.Lock()
        self.compute_lock = threading.Lock()
        self._probe: Probe | None = None

    def probe(self) -> Probe:
        with self.setup_lock:
            if self._probe is None:
                from kvpipe.store import FeatureStore

                job = self.job
                store = FeatureStore.open(job.store)
                self._probe = PROBES.get(job.task)(store, job.params, device=resolve_device(job.device),
                                                   selection=job.selection)
            return self._probe

    def start(self) -> tuple[int, str]:
        """Build the probe now; this process's id and the device it computes on."""
        return os.getpid(), self.probe().device

    def score(self, target: Target) -> Scored:
        probe = self.probe()
        cached = self.cache.get(target)
        if cached is not None:  # finished by this actor's previous life
            return Scored(target, cached, 0.0, 0.0, probe.device)
        t = time.perf_counter()
        data = probe.read(target) if is_split(probe) else None
        read_s = time.perf_counter() - t
        with self.compute_lock:
            scores, compute_s = compute_target(probe, target, data, self.cache)
        return Scored(target, scores, read_s, compute_s, probe.device)


class RayProbeExecutor(ProbeExecutor):
    def check(self, options: ExecutorOptions) -> None:
        import_ray()
        if options.workers is not None and options.workers < 1:
            raise UsageError(f"--workers {options.workers}: give at least 1")
        if options.address:
            check_address(options.address)

    def driver_device(self, device: str) -> str:
        """The driver only lists targets and draws: no GPU of its own needed."""
        return resolve_device("numpy" if device == "numpy" else "cpu")

    def score(self, probe: Probe, job: SweepJob, targets: list[Target], options: ExecutorOptions,
              prefetch: bool = True) -> Iterator[Scored]:
        started = connect(options.address)
        ray = import_ray()
        actors: list[Any] = []
        try:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            gpu = job.device != "numpy" and job.device != "cpu" and gpus > 0
            if job.device.startswith("cuda") and not gpus:
                raise UsageError(f"--device {job.device}: the Ray cluster has no GPU; use --device auto or cpu")
            # each GPU actor sees its own GPU only (Ray sets CUDA_VISIBLE_DEVICES): cuda means cuda:0 there
            spec = "cuda" if gpu else ("cpu" if job.device == "auto" else job.device)
            actor_job = SweepJob(job.store, job.task, job.params, spec, job.selection, job.cache_dir)
            n = options.workers or (gpus if gpu else CPU_WORKERS)
            n = max(1, min(n, len(targets))) if targets else 0
            opts: dict[str, Any] = dict(max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES,
                                        max_concurrency=IN_FLIGHT, num_cpus=1)
            if gpu:
                opts["num_gpus"] = 1
            actor_cls = ray.remote(**opts)(SweepActor)
            run_id = uuid.uuid4().hex[:8]
            made = [0]

            def new_actor() -> Any:
                made[0] += 1  # findable with ray.util.list_named_actors
                return actor_cls.options(name=f"kvpipe-probe-{run_id}-w{made[0] - 1}").remote(actor_job)

            actors.extend(new_actor() for _ in range(n))
            pids = [self._call(ray, a.start.remote())[0] for a in actors]
            if options.on_start:
                options.on_start(pids)
            yield from self._run(ray, actors, targets, new_actor)
        finally:
            for a in actors:
                try:
                    ray.kill(a)
                except Exception:
                    pass
            if started:
                ray.shutdown()

    @staticmethod
    def _call(ray: Any, ref: Any) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as err:
            raise KvpipeError(f"a Ray probe worker could not start: {one_line(err)}") from None
        except ray.exceptions.RayTaskError as err:
            raise cause(err) from None

    def _run(self, ray: Any, actors: list[Any], targets: list[Target], new_actor: Any) -> Iterator[Scored]:
        pool = ActorQueue(ray, actors, targets, lambda actor, tgt: actor.score.remote(tgt), new_actor, IN_FLIGHT)
        lost: dict[Target, int] = {}
        for tgt, ref in pool:
            try:
                res: Scored = ray.get(ref)
            except ray.exceptions.RayActorError as err:  # restarts and retries used up
                lost[tgt] = lost.get(tgt, 0) + 1
                if lost[tgt] > MAX_RESUBMITS:
                    raise KvpipeError(f"target {tgt.kind} layer {tgt.layer} head {tgt.head}: its Ray worker died "
                                      f"{lost[tgt]} times ({one_line(err)})") from None
                pool.retry(tgt)
            except ray.exceptions.RayTaskError as err:
                raise cause(err) from None
            else:
                yield res
