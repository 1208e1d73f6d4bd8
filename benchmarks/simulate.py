"""Benchmark: the local simulation's accuracy, wall time and per-round overhead.

    .venv/bin/python benchmarks/simulate.py            # writes benchmarks/results/simulate.json
    .venv/bin/python benchmarks/simulate.py --local-performance
        # 10 digits clients and 40 MNIST clients (the seed's setup), each with the local-mode
        # speed-ups and without them (in-process clients polling every 0.1 s); writes
        # benchmarks/results/local-performance.json (docs/results/local-performance.md)

Targets (issue 2): 10 non-IID clients on digits reach >= 0.90 test accuracy; 10 clients x
15 rounds finish within 3 minutes on the 2-core development machine. The numbers are
measured and written down here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sfl.local.simulate import SimulationOptions, run_simulation

RESULTS = Path(__file__).parent / "results" / "simulate.json"
LOCAL_PERFORMANCE = Path(__file__).parent / "results" / "local-performance.json"


def measure(clients: int, rounds: int, seed: int, **options: Any) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        cpu = _cpu_seconds()
        result = run_simulation(
            SimulationOptions(out=Path(out), clients=clients, rounds=rounds, seed=seed, **options)
        )
        wall = time.perf_counter() - started
        cpu = _cpu_seconds() - cpu
    overheads = [r["overhead_seconds"] for r in result.rounds if r["overhead_seconds"] is not None]
    totals = [r["timings"]["total"] for r in result.rounds if r["timings"]["total"] is not None]
    scored = [r["accuracy"] for r in result.rounds if r["accuracy"] is not None]
    return {
        "clients": clients,
        "rounds": rounds,
        "seed": seed,
        "partition": options.get("partition", "dirichlet(0.5)"),
        "task": options.get("task", "digits"),
        "options": {k: v for k, v in options.items() if k not in ("task", "partition")},
        "statuses": [r["status"] for r in result.rounds],
        "round_seconds": [round(t, 2) for t in totals],
        "overhead_seconds": [round(o, 2) for o in overheads],
        "cpu_seconds": round(cpu, 1),
        "wall_seconds": round(wall, 2),
        "initial_accuracy": round(result.initial_accuracy, 4),
        "final_accuracy": round(scored[-1], 4) if scored else None,
        "best_accuracy": round(max(scored), 4) if scored else None,
        "first_round_reaching_0.90": next(
            (r["round"] for r in result.rounds if (r["accuracy"] or 0.0) >= 0.90), None
        ),
        "round_seconds_median": round(statistics.median(totals), 3),
        "overhead_seconds_median": round(statistics.median(overheads), 3),
        "overhead_seconds_max": round(max(overheads), 3),
    }


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the client worker processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


#: The local-mode speed-ups off: every client a thread of this process, polling every 0.1 s.
WITHOUT_SPEEDUPS = {"wake_ups": False, "client_processes": 0}
MNIST_SEED_SETUP = {"task": "mnist", "partition": "iid", "local_epochs": 1}


def local_performance(rounds: int) -> list[dict[str, object]]:
    runs = []
    for speedups in (True, False):
        extra = {} if speedups else WITHOUT_SPEEDUPS
        runs.append(measure(10, rounds, 0, **extra))
        runs.append(measure(40, rounds, 0, **MNIST_SEED_SETUP, **extra))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--local-performance", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="with --local-performance")
    args = parser.parse_args()
    if args.local_performance:
        runs = local_performance(args.rounds)
        args.out = args.out or LOCAL_PERFORMANCE
    else:
        runs = [measure(10, 15, seed) for seed in args.seeds]
        runs.append(measure(10, 20, 0))  # what `make demo` runs
        args.out = args.out or RESULTS
    report = {
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for run in runs:
        print(json.dumps(run))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
