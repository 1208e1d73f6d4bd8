"""Simulated devices in worker processes, so their training and HTTP clients use every core.

In one process, 40 client threads, moto's request threads and the averager share one GIL:
a round's aggregation waits behind dozens of training threads and outlives its lease. Here
each worker process runs a share of the clients as threads (the same ``EdgeClient`` loop,
crash-restarted like a Greengrass component), reaching the emulator over HTTP with the
credentials endpoint, as a device reaches AWS. What the parent needs back travels through
``multiprocessing`` primitives: the stop signal, assignment wake-ups, and fault records.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from typing import Any

from edge_client.settings import ClientSettings
from sfl.local.device import run_client
from sfl.local.faults import FaultLog, FaultPlan, client_hooks


@dataclass(frozen=True)
class WorkerSpec:
    """Everything one worker process needs (picklable: the process is spawned, not forked,
    since the parent runs threads)."""

    clients: tuple[tuple[ClientSettings, bool], ...]  # (settings, hostile)
    task: str
    task_params: str  # the federation's task_params, a JSON object
    attack: str
    plan: FaultPlan
    env: tuple[tuple[str, str], ...]
    restart_after: float
    wake_ups: bool


class _Relay(FaultLog):
    """A worker's fault log: each record goes to the parent."""

    def __init__(self, out: Any) -> None:
        super().__init__()
        self._out = out

    def add(self, round_number: int, client_id: str, fault: str, **details: Any) -> None:
        self._out.put((round_number, client_id, fault, details))


def _worker_main(spec: WorkerSpec, stop: Any, cond: Any, writes: Any, faults_out: Any) -> None:
    import torch

    from sfl.learning.tasks import load_task
    from sfl.local.attacks import HostileTask

    os.environ.update(dict(spec.env))
    torch.set_num_threads(1)
    task = load_task(spec.task, spec.task_params)
    hostile = HostileTask(task, spec.attack) if any(h for _, h in spec.clients) else None
    log = _Relay(faults_out)
    local_stop = threading.Event()

    def pause_factory() -> Callable[[float], None]:
        with cond:
            seen = writes.value

        def pause(timeout: float) -> None:
            nonlocal seen
            with cond:
                cond.wait_for(lambda: stop.is_set() or writes.value > seen, timeout)
                seen = writes.value

        return pause

    threads = []
    for settings, is_hostile in spec.clients:
        hooks, _ = client_hooks(spec.plan, settings.client_id, log, local_stop)
        thread = threading.Thread(
            target=run_client,
            args=(
                settings,
                _clients,
                hostile if is_hostile and hostile is not None else task,
                local_stop,
                hooks,
                spec.restart_after,
                pause_factory() if spec.wake_ups else None,
            ),
            name=settings.client_id,
            daemon=True,
        )
        thread.start()
        threads.append(thread)
    stop.wait()
    local_stop.set()
    with cond:
        cond.notify_all()
    for thread in threads:
        thread.join(timeout=30)


def _clients() -> Any:
    """S3 and DynamoDB clients from the worker's environment (endpoint and the local
    credentials endpoint, nothing else)."""
    import boto3
    import botocore.session
    from botocore.credentials import ContainerProvider, CredentialResolver

    from sfl.state.aws import make_clients

    core = botocore.session.Session()
    core.register_component(
        "credential_provider", CredentialResolver([ContainerProvider(environ=dict(os.environ))])
    )
    session = boto3.session.Session(botocore_session=core, region_name=os.environ["AWS_REGION"])
    return make_clients(endpoint_url=os.environ["AWS_ENDPOINT_URL"], session=session)


class ClientProcesses:
    """``processes`` workers sharing the clients; ``notify()`` tells them the assignment
    was written; ``stop()`` ends them. Fault records land in ``faults``."""

    def __init__(
        self,
        clients: Sequence[tuple[ClientSettings, bool]],
        *,
        processes: int,
        task: str,
        task_params: str = "{}",
        attack: str,
        plan: FaultPlan,
        env: dict[str, str],
        restart_after: float,
        wake_ups: bool,
        faults: FaultLog,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._cond = ctx.Condition()
        self._writes = ctx.Value("Q", 0, lock=False)
        self._faults_in: Any = ctx.Queue()
        self._faults = faults
        # Hostile clients share one worker: an attack may coordinate them (one HostileTask).
        hostile = [c for c in clients if c[1]]
        honest = [c for c in clients if not c[1]]
        count = max(1, min(processes, len(clients)))
        shares: list[list[tuple[ClientSettings, bool]]] = [[] for _ in range(count)]
        shares[0].extend(hostile)
        for i, client in enumerate(honest):
            shares[(i + 1) % count if hostile else i % count].append(client)
        self._procs: list[SpawnProcess] = []
        for i, share in enumerate(s for s in shares if s):
            spec = WorkerSpec(
                clients=tuple(share),
                task=task,
                task_params=task_params,
                attack=attack,
                plan=plan,
                env=tuple(sorted(env.items())),
                restart_after=restart_after,
                wake_ups=wake_ups,
            )
            proc = ctx.Process(
                target=_worker_main,
                args=(spec, self._stop, self._cond, self._writes, self._faults_in),
                name=f"sfl-clients-{i}",
                daemon=True,
            )
            self._procs.append(proc)
        self._drain = threading.Thread(target=self._collect, name="fault-relay", daemon=True)

    def start(self) -> ClientProcesses:
        for proc in self._procs:
            proc.start()
        self._drain.start()
        return self

    def notify(self) -> None:
        with self._cond:
            self._writes.value += 1
            self._cond.notify_all()

    def _collect(self) -> None:
        while True:
            try:
                item = self._faults_in.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set() and not any(p.is_alive() for p in self._procs):
                    return
                continue
            round_number, client_id, fault, details = item
            self._faults.add(round_number, client_id, fault, **details)

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for proc in self._procs:
            proc.join(timeout=40)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        self._drain.join(timeout=5)
