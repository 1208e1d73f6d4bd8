"""Benchmark: the local simulation's accuracy, wall time and per-round overhead.

    .venv/bin/python benchmarks/simulate.py            # writes benchmarks/results/simulate.json

Targets (issue 2): 10 non-IID clients on digits reach >= 0.90 test accuracy; 10 clients x
15 rounds finish within 3 minutes on the 2-core development machine. The numbers are
measured and written down here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from sfl.local.simulate import SimulationOptions, run_simulation

RESULTS = Path(__file__).parent / "results" / "simulate.json"


def measure(clients: int, rounds: int, seed: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = run_simulation(
            SimulationOptions(out=Path(out), clients=clients, rounds=rounds, seed=seed)
        )
        wall = time.perf_counter() - started
    overheads = [r["overhead_seconds"] for r in result.rounds if r["overhead_seconds"] is not None]
    totals = [r["timings"]["total"] for r in result.rounds if r["timings"]["total"] is not None]
    accuracies = [r["accuracy"] for r in result.rounds]
    return {
        "clients": clients,
        "rounds": rounds,
        "seed": seed,
        "partition": "dirichlet(0.5)",
        "task": "digits",
        "wall_seconds": round(wall, 2),
        "initial_accuracy": round(result.initial_accuracy, 4),
        "final_accuracy": round(accuracies[-1], 4),
        "best_accuracy": round(max(accuracies), 4),
        "first_round_reaching_0.90": next(
            (r["round"] for r in result.rounds if r["accuracy"] >= 0.90), None
        ),
        "round_seconds_median": round(statistics.median(totals), 3),
        "overhead_seconds_median": round(statistics.median(overheads), 3),
        "overhead_seconds_max": round(max(overheads), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = [measure(10, 15, seed) for seed in args.seeds]
    runs.append(measure(10, 20, 0))  # what `make demo` runs
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
