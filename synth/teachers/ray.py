"""A generate stage's teacher on Ray workers: `ray:` in the stage spreads its requests over Ray actors,
each running the stage's own backend (hf, openai or vllm); completions come back to this process, which
commits them through the usual store contract (synth/stages/generate.py). Needs `pip install 'synth-distill[ray]'`.

    stages:
      solutions: {kind: generate, input: problems, teacher: big, prompt: solve, samples: 4,
                  ray: {workers: 8, num_gpus: 1, chunk_size: 64, address: auto}}

Request ids are computed here, in the driver, before anything is dispatched, so they (and the cache,
resume and dedup) are the same as in a single-process run; `ray:` is not part of the stage's
fingerprint. With `hf`, a sample's text depends on its batch (a batch is seeded from its first
request): keep chunk_size a multiple of the teacher's batch_size to get the same texts as without Ray.

How it runs:
- `address` unset: a local cluster on this machine, started by this process and shut down with it
  (no dashboard, worker logs not echoed; ~10 s to start on a 2-core machine). `workers x num_cpus`
  must fit the machine's cores (0.5 lets two workers share one). "auto" / "HOST:6379" /
  "ray://HOST:10001": a running cluster, left running afterwards.
- `workers` actors, each reserving `num_cpus` / `num_gpus`, each building the teacher with
  load_teacher() inside the actor (a model load per worker). The pipeline's requests go out in chunks
  of `chunk_size`, two chunks queued per actor so that none idles between chunks; each chunk's
  completions are yielded when it returns, in the order chunks finish. Ray sets OMP_NUM_THREADS in each
  worker to its num_cpus (at least 1): an hf teacher on CPU computes with that many threads.
- Exactly one Completion per request: the driver checks each returned chunk against its requests
  (a missing one becomes a `worker_error` row, an unknown or repeated one is dropped).
- A worker that dies (killed, OOM, node lost: a RayActorError or any other Ray system error) is not
  replaced; each chunk it had is resubmitted once to the remaining workers, and a chunk lost a second
  time comes back as error Completions (cause `worker_lost`) that a re-run retries. Resubmitting once
  makes a run survive a preempted node; not more than once, so that a chunk that kills its worker (a
  poison request, OOM) costs at most two workers. Requests of a lost chunk may have reached an API
  server already; they are recorded once all the same (the driver yields each chunk once). With no
  worker left the stage stops with a SynthError; what had arrived is committed and a re-run continues.
- A worker's backend that raises (a bug, an exception the backend does not turn into a Completion)
  makes its chunk `worker_error` rows; a SynthError raised there (bad key, model not found, model
  cannot load) stops the stage with that message, as it would without Ray.
- stop() (budgets): no new chunks are dispatched; the chunks in flight still come back and are
  yielded, so a budget is overshot by at most workers x 2 x chunk_size requests.
- close(): gives each backend up to CLOSE_WAIT_S to close (a vLLM engine frees its GPU), kills the
  actors, and shuts Ray down only if this teacher started or connected it (a caller that had already
  called ray.init() keeps its session).
- The openai backend's per-answer hook (on_result: budget accounting before the next request) does
  not cross processes, so this class never calls it (calls_on_result_in_worker is False): stages/generate.py
  then accounts each completion here, in the driver, as it arrives. The Batch API mode (`mode: batch`)
  runs on the provider's side and keeps its state in the store; it cannot run on Ray workers.

On a real cluster (vLLM on GPU nodes):
    head:        ray start --head --port=6379
    each node:   ray start --address=HEAD:6379          (same Python, synth-distill and vllm installed)
    pipeline:    ray: {address: auto, workers: 8, num_gpus: 1}   (run `synth run` on the head)
Each worker then runs its own vLLM engine on the one GPU Ray gives it (CUDA_VISIBLE_DEVICES); for a
model split over several GPUs, num_gpus = the engine's tensor_parallel_size (teacher `engine:`; not
tried on GPUs yet).
The model must be readable on every node: a hub id (each node downloads or has it in its HF cache) or a
path on shared storage. A model directory given relative to the pipeline file is resolved to an
absolute path here, in the driver, so that path must exist at the same place on the workers. API keys
(openai backend, `api_key_env`) are read in the workers' environment: on a local cluster they inherit
this process's; on a cluster, set them where `ray start` runs.

Why actors and not Ray Data (`map_batches` with vLLM): a Ray Data pipeline owns its output (it writes
datasets), while a generate stage must stream each result back into the store as it arrives (the cache
and crash-safety contract), record each request id exactly once, and stop cleanly on a budget (stop())
with the in-flight work kept. Long-lived actors with one engine each, and chunks whose fate the driver
tracks, give exactly that in a few dozen lines; with Ray Data the results would pass through a dataset
of its own first, and when a block is retried or its output lands would be Ray Data's decision, not the
stage's (iter_batches can stream them back, but a budget stop or a lost block is then harder to account).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from synth.errors import SynthError, one_line
from synth.secrets import scrub
from synth.teachers import load_teacher  # the package dispatches; it never imports this module
from synth.teachers.base import Capabilities, Completion, Request, TeacherBase, resolve_model_path

IN_FLIGHT_PER_WORKER = 2  # chunks queued on each actor: the next one starts the moment one finishes
WAIT_NOTICE_S = 60.0  # say so on stderr when no worker has started after this long (cluster full, autoscaling)
CLOSE_WAIT_S = 10.0  # close(): how long the backends get to shut down before their actors are killed
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20  # results are text: a small store is plenty (Ray spills past it)


class TeacherWorker:
    """The Ray actor: one backend instance, fed a chunk of requests at a time. The backend is built in
    start(), not in __init__, so that its SynthError (cannot load the model, no API key) comes back as
    the method's exception with its message, not as an opaque actor-creation failure."""

    def __init__(self, name: str, config, base_dir: str):
        self.name, self.config, self.base_dir = name, config, base_dir
        self.teacher = None

    def start(self) -> int:
        self.teacher = load_teacher(self.name, self.config, Path(self.base_dir))
        return os.getpid()

    def run(self, requests: list[Request]) -> list[Completion]:
        return list(self.teacher.generate(requests))

    def close(self) -> None:
        if self.teacher is not None:
            self.teacher.close()


@dataclass
class _Chunk:
    requests: list[Request]
    attempts: int = 0  # dispatches so far: a chunk lost twice comes back as worker_lost errors


@dataclass
class _Slot:
    index: int
    actor: object
    starting: object | None  # the ObjectRef of start() until it has returned
    pid: int | None = None
    inflight: set = field(default_factory=set)  # ObjectRefs of its chunks

    @property
    def ready(self) -> bool:
        return self.starting is None


class RayTeacher(TeacherBase):
    def __init__(self, name: str, config, base_dir: Path, options):
        if getattr(config, "mode", "online") == "batch":
            raise SynthError(f"teacher '{name}': mode batch runs on the provider's side and cannot run on Ray "
                             "workers: remove `ray:` from the stages that use it")
        try:
            import ray
        except ImportError:
            raise SynthError(f"teacher '{name}': `ray:` needs Ray: pip install 'synth-distill[ray]'") from None
        self._ray = ray
        self.name, self.config, self.options = name, config, options
        self.model = config.model  # what request ids hash: the name as written, never the resolved path
        self.capabilities: Capabilities = config.capabilities()
        self._stopped = False
        self._slots: list[_Slot] = []
        self._started_ray = False
        if config.backend in ("hf", "vllm"):
            # a model directory next to the pipeline file is found here; workers get its absolute path
            config = config.model_copy(update={"model": resolve_model_path(config.model, base_dir)})
        self._connect()
        remote = ray.remote(TeacherWorker).options(num_cpus=options.num_cpus, num_gpus=options.num_gpus,
                                                   max_restarts=0, max_task_retries=0)
        for i in range(options.workers):
            actor = remote.remote(name, config, str(Path(base_dir).resolve()))
            self._slots.append(_Slot(i, actor, actor.start.remote()))

    # ---- cluster --------------------------------------------------------------------------------

    def _connect(self) -> None:
        ray, o = self._ray, self.options
        if ray.is_initialized():  # a caller's session (library use): use it, leave it running
            return
        import logging

        if o.address is None:
            # a local cluster gets a token of its own; Ray's notice about it is not the user's business
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            cpus = os.cpu_count() or 1
            if o.workers * o.num_cpus > cpus:
                raise SynthError(f"teacher '{self.name}': ray: workers x num_cpus = {o.workers * o.num_cpus:g} CPUs, "
                                 f"but this machine has {cpus}: lower workers or num_cpus (0.5 lets two workers "
                                 "share a core), or give address: of a cluster")
            kwargs = dict(address="local", num_cpus=cpus, include_dashboard=False,
                          object_store_memory=LOCAL_OBJECT_STORE_BYTES)
        else:
            self._reachable(o.address)
            kwargs = dict(address=o.address)
        try:
            ray.init(**kwargs, log_to_driver=False, logging_level=logging.WARNING, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {o.address!r}" if o.address else "a local Ray cluster"
            raise SynthError(f"teacher '{self.name}': cannot start or reach {where}: "
                             f"{scrub(' '.join(str(exc).split()))[:300]}") from None
        self._started_ray = True
        gpus = ray.cluster_resources().get("GPU", 0)
        if o.num_gpus > 0 and o.address is None and o.workers * o.num_gpus > gpus:
            self.close()
            raise SynthError(f"teacher '{self.name}': ray: workers x num_gpus = {o.workers * o.num_gpus:g} GPUs, but "
                             f"this machine has {gpus:g} that Ray can use: lower workers or num_gpus, or give "
                             "address: of a GPU cluster")

    def _reachable(self, address: str) -> None:
        """A HOST:PORT (or ray://HOST:PORT) that nothing listens on makes ray.init() retry for minutes:
        try one TCP connection first. ("auto" is resolved by Ray, which fails at once when it finds none.)"""
        import socket

        host, _, port = address.removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            return
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
        except OSError as exc:
            raise SynthError(f"teacher '{self.name}': ray: address {address!r}: no Ray cluster answers there "
                             f"({exc.strerror or exc}); start one (`ray start --head`) or fix the address") from None

    # ---- the Teacher protocol ------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> Iterator[Completion]:
        ray = self._ray
        self._stopped = False
        size = self.options.chunk_size
        todo = deque(_Chunk(list(requests[i:i + size])) for i in range(0, len(requests), size))
        inflight: dict = {}  # ObjectRef -> (chunk, slot)
        waiting_since = time.monotonic()
        while inflight or (todo and not self._stopped):
            if not self._stopped:
                for slot in self._slots:
                    while slot.ready and todo and len(slot.inflight) < IN_FLIGHT_PER_WORKER:
                        chunk = todo.popleft()
                        chunk.attempts += 1
                        ref = slot.actor.run.remote(chunk.requests)
                        slot.inflight.add(ref)
                        inflight[ref] = (chunk, slot)
            starting = {s.starting: s for s in self._slots if not s.ready}
            if not inflight and not starting:
                if self._stopped or not todo:
                    break
                raise SynthError(f"teacher '{self.name}': all {self.options.workers} Ray workers were lost; "
                                 f"{sum(len(c.requests) for c in todo)} requests were not answered — the "
                                 "completions that arrived are saved: re-run to continue")
            done, _ = ray.wait([*inflight, *starting], num_returns=1, timeout=WAIT_NOTICE_S)
            if not done:
                if not any(s.ready for s in self._slots) and time.monotonic() - waiting_since >= WAIT_NOTICE_S:
                    self._notice(f"waiting for Ray workers to start (0 of {len(starting)} ready); each needs "
                                 f"{self.options.num_cpus:g} CPU, {self.options.num_gpus:g} GPU; cluster "
                                 f"has {ray.cluster_resources()}")
                continue
            ref = done[0]
            if ref in starting:
                self._started(starting[ref], ref)
                continue
            chunk, slot = inflight.pop(ref)
            slot.inflight.discard(ref)
            yield from self._finished(chunk, slot, ref, todo)

    def _started(self, slot: _Slot, ref) -> None:
        ray = self._ray
        try:
            slot.pid = ray.get(ref)
            slot.starting = None
        except ray.exceptions.RayTaskError as exc:  # load_teacher raised in the worker
            cause = exc.cause if exc.cause is not None else exc
            if isinstance(cause, SynthError):  # bad key, model not found: what it says, and where
                raise SynthError(scrub(f"{cause} (on Ray worker {slot.index}: workers read the model, files and "
                                       "environment variables of their own node)")) from None
            raise SynthError(f"teacher '{self.name}': a Ray worker could not build the {self.config.backend} "
                             f"backend: {type(cause).__name__}: {scrub(' '.join(str(cause).split()))[:300]}") from None
        except ray.exceptions.RayError as exc:  # the worker process died while starting
            self._lose(slot, exc)

    def _finished(self, chunk: _Chunk, slot: _Slot, ref, todo: deque) -> Iterator[Completion]:
        ray = self._ray
        try:
            got = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the backend raised inside the worker; the worker lives
            cause = exc.cause if exc.cause is not None else exc
            if isinstance(cause, SynthError):  # a condition no request survives (bad key, model not found)
                raise SynthError(scrub(str(cause))) from None
            message = scrub(f"{type(cause).__name__}: {' '.join(str(cause).split())}")[:500]
            for r in chunk.requests:
                yield Completion(r.id, error="worker_error", error_message=f"Ray worker {slot.index}: {message}")
            return
        except ray.exceptions.RayError as exc:  # the worker is gone (killed, OOM, node lost) or unreachable
            self._lose(slot, exc)
            if chunk.attempts < 2:
                todo.appendleft(chunk)  # once more, on a worker that is still there
                return
            for r in chunk.requests:
                yield Completion(r.id, error="worker_lost", error_message=(
                    f"the Ray worker running this request was lost twice: {type(exc).__name__}"))
            return
        yield from _exactly_once(chunk.requests, got)

    def _lose(self, slot: _Slot, exc: BaseException) -> None:
        if slot not in self._slots:
            return  # already counted through another of its chunks
        self._slots.remove(slot)
        try:
            self._ray.kill(slot.actor)  # unreachable rather than dead: make sure it does no more work
        except Exception:
            pass
        pid = f" (pid {slot.pid})" if slot.pid else ""
        self._notice(f"Ray worker {slot.index}{pid} lost: {_why(exc)}; its chunks are resubmitted once; "
                     f"{len(self._slots)} of {self.options.workers} workers left")

    def _notice(self, text: str) -> None:
        print(scrub(f"  teacher '{self.name}': {text}"), file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._stopped = True  # checked before each dispatch; chunks in flight still come back

    def close(self) -> None:
        ray = self._ray
        # the backends shut down first (a vLLM engine frees its GPU), for up to CLOSE_WAIT_S: a worker
        # still busy with a chunk (after an error or Ctrl-C) is killed without waiting for it
        closing = [slot.actor.close.remote() for slot in self._slots if slot.ready]
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=CLOSE_WAIT_S)
        for slot in self._slots:
            try:
                ray.kill(slot.actor)
            except Exception:
                pass
        self._slots = []
        if self._started_ray:
            self._started_ray = False
            ray.shutdown()


def _why(exc: BaseException) -> str:
    """The gist of a Ray system error for one stderr line: Ray's messages run to a dozen lines (ids,
    namespace, troubleshooting advice); keep why the actor died, where, and the exit detail."""
    text = one_line(exc)
    because = re.search(r"is dead because (.+?\.)(?: |$)", text)
    if not because:
        return f"{type(exc).__name__}: {text[:200]}"
    where = re.search(r" ip: (\S+)", text)
    detail = re.search(r"Worker exit detail: (.+?\.)(?: |$)", text)
    return (because.group(1).rstrip(".") + (f" on {where.group(1)}" if where else "")
            + (f" ({detail.group(1).rstrip('.')})" if detail else ""))


def _exactly_once(requests: list[Request], got: list[Completion]) -> Iterator[Completion]:
    """The chunk's completions, exactly one per request: unknown or repeated ids are dropped, a
    request the backend did not answer becomes a worker_error row (a re-run retries it)."""
    wanted = {r.id for r in requests}
    for c in got:
        if c.request_id in wanted:
            wanted.discard(c.request_id)
            if c.error_message:  # unpickled: scrubbed in the worker with its keys, here with the driver's
                c.error_message = scrub(c.error_message)
            yield c
    for r in requests:
        if r.id in wanted:
            yield Completion(r.id, error="worker_error",
                             error_message="the Ray worker's backend returned no completion for this request")
