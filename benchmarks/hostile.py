"""Benchmark: one hostile device against the default bounds, and what the bounds cost.

    .venv/bin/python benchmarks/hostile.py        # writes benchmarks/results/hostile.json

Issue 8's evidence: with 5 clients on digits and 1 attacker (a real EdgeClient uploading
through the same path), each attack with the default bounds on and with them off
(``max_weight_ratio`` 10^6, ``norm_bound_factor`` 0); and the clean `make demo` run (10
clients, Dirichlet 0.5, 20 rounds) with the bounds on and off, whose final accuracies must
stay within 1 point. Measured and written down here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from sfl.local.attacks import ATTACKS
from sfl.local.simulate import SimulationOptions, run_simulation

RESULTS = Path(__file__).parent / "results" / "hostile.json"
BOUNDS_OFF = (("max_weight_ratio", "1000000"), ("norm_bound_factor", "0"))


def measure(label: str, **options: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = run_simulation(SimulationOptions(out=Path(out), **options))
        wall = time.perf_counter() - started
    accuracies = [r["accuracy"] for r in result.rounds if r["accuracy"] is not None]
    row = {
        "run": label,
        "clients": options["clients"],
        "rounds": options["rounds"],
        "seed": options.get("seed", 0),
        "attackers": options.get("attackers", 0),
        "attack": options.get("attack") if options.get("attackers") else None,
        "bounds": "off" if options.get("config_overrides") else "default",
        "closed_rounds": sum(r["status"] == "CLOSED" for r in result.rounds),
        "initial_accuracy": round(result.initial_accuracy, 4),
        "final_accuracy": round(accuracies[-1], 4) if accuracies else None,
        "best_accuracy": round(max(accuracies), 4) if accuracies else None,
        "wall_seconds": round(wall, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = []
    for seed in args.seeds:
        for attack in ATTACKS:
            for overrides in ((), BOUNDS_OFF):
                runs.append(
                    measure(
                        f"attack-{attack}",
                        clients=5,
                        rounds=10,
                        seed=seed,
                        attackers=1,
                        attack=attack,
                        config_overrides=overrides,
                    )
                )
        for overrides in ((), BOUNDS_OFF):
            runs.append(
                measure("clean-demo", clients=10, rounds=20, seed=seed, config_overrides=overrides)
            )
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
