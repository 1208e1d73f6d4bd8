"""``make bench-scale``: how far one round scales here, and what that projects to on AWS.

Three parts, written to ``benchmarks/results/scale.json``:

(a) the seed's experiment through ``sfl simulate`` (40 MNIST clients, IID, all picked, one
    local epoch): seconds per round and the overhead beyond the slowest client's training;
(b) ``sfl loadtest`` rounds of 1,000 and 10,000 virtual clients, each in its own process (so
    peak RSS is that run's), with per-phase timings, averager invocations, bytes and the
    round item's size as DynamoDB counts it;
(c) a projection of each load test onto AWS from the measured sizes and AWS's published
    limits (listed in ``AWS_LIMITS`` with their sources).

Usage: python benchmarks/scale.py [--sizes 1000 10000] [--simulate-rounds 2] [--skip-simulate]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"

#: AWS limits the projection rests on, each with where it is stated (read 2026-11-29).
AWS_LIMITS: dict[str, dict[str, Any]] = {
    "dynamodb_item_bytes": {
        "value": 400 * 1024,
        "source": "https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/"
        "ServiceQuotas.html (item size limit 400 KB)",
    },
    "dynamodb_partition_wcu_per_s": {
        "value": 1_000,
        "source": "https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/"
        "warm-throughput-scenarios.html: each partition is limited to 1,000 write units and "
        "3,000 read units per second (on-demand tables too)",
    },
    "dynamodb_partition_rcu_per_s": {"value": 3_000, "source": "as above"},
    "dynamodb_write_unit_bytes": {
        "value": 1024,
        "source": "https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/"
        "CapacityUnitCalculations.html (one write unit per 1 KB of item, rounded up; one "
        "strongly consistent read unit per 4 KB)",
    },
    "dynamodb_read_unit_bytes": {"value": 4096, "source": "as above"},
    "dynamodb_on_demand_initial_wcu_per_s": {
        "value": 4_000,
        "source": "warm-throughput-scenarios.html: a new on-demand table starts with a warm "
        "throughput of 12,000 read and 4,000 write units per second",
    },
    "s3_put_per_s_per_prefix": {
        "value": 3_500,
        "source": "https://docs.aws.amazon.com/AmazonS3/latest/userguide/"
        "optimizing-performance.html: at least 3,500 PUT/COPY/POST/DELETE and 5,500 GET/HEAD "
        "requests per second per partitioned prefix (a new prefix starts as one partition)",
    },
    "s3_get_per_s_per_prefix": {"value": 5_500, "source": "as above"},
    "lambda_account_concurrency": {
        "value": 1_000,
        "source": "https://docs.aws.amazon.com/lambda/latest/dg/lambda-concurrency.html "
        "(default concurrent executions per Region; a soft quota)",
    },
    "lambda_scaling_per_10s": {
        "value": 1_000,
        "source": "https://docs.aws.amazon.com/lambda/latest/dg/scaling-behavior.html: per "
        "function, 1,000 more execution environments every 10 seconds",
    },
}


def run_simulation(rounds: int, out: Path) -> dict[str, Any]:
    """(a): the seed's experiment through the existing ``sfl simulate`` path."""
    from sfl.local.simulate import SimulationError, SimulationOptions, run_simulation

    options = SimulationOptions(
        out=out,
        clients=40,
        rounds=rounds,
        task="mnist",
        partition="iid",
        fraction=1.0,
        local_epochs=1,
    )
    started = time.perf_counter()
    try:
        result = run_simulation(options)
    except (SimulationError, ValueError, OSError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    rows = [
        {
            "round": r["round"],
            "status": r["status"],
            "seconds": r["timings"]["total"],
            "overhead_seconds": r["overhead_seconds"],
            "train_seconds_slowest": r["timings"]["train"],
            "accuracy": r["accuracy"],
        }
        for r in result.rounds
    ]
    totals = [r["seconds"] for r in rows if r["seconds"] is not None]
    overheads = [r["overhead_seconds"] for r in rows if r["overhead_seconds"] is not None]
    return {
        "command": "sfl simulate --task mnist --partition iid --clients 40 --set fraction=1 "
        f"--set local_epochs=1 --rounds {rounds}",
        "rounds": rows,
        "seconds_per_round": sum(totals) / len(totals) if totals else None,
        "overhead_seconds_per_round": sum(overheads) / len(overheads) if overheads else None,
        "wall_seconds": time.perf_counter() - started,
    }


def run_loadtest(clients: int, timeout: float, workers: int) -> dict[str, Any]:
    """(b): one ``sfl loadtest`` round in its own process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "loadtest.json"
        command = [
            sys.executable, "-m", "sfl.cli.main", "loadtest", "--clients", str(clients),
            "--workers", str(workers), "--deadline", str(int(timeout)), "--out", str(out),
        ]  # fmt: skip
        started = time.perf_counter()
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=3 * timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return {
                "clients": clients,
                "error": f"did not finish within {3 * timeout:.0f} s",
                "wall_seconds": time.perf_counter() - started,
            }
        wall = time.perf_counter() - started
        if not out.exists():
            return {
                "clients": clients,
                "error": f"exit {done.returncode}: {done.stderr[-2000:]}",
                "wall_seconds": wall,
            }
        report: dict[str, Any] = json.loads(out.read_text())
    report["exit_code"] = done.returncode
    report["wall_seconds"] = wall
    report["command"] = f"sfl loadtest --clients {clients} --workers {workers}"
    return report


def project(report: dict[str, Any], clients: int | None = None) -> dict[str, Any]:
    """(c): one load test's sizes on AWS, bounded by the limits in ``AWS_LIMITS``; with
    ``clients``, scaled from that run to a round of that many clients."""
    measured = int(report["clients"])
    n = clients or measured
    lim = {k: v["value"] for k, v in AWS_LIMITS.items()}
    # Today each answer is a SET on the one round item, which grows by about the same
    # number of bytes per answer: write k costs ceil(size_k / 1 KB) write units.
    answers = int(report.get("answers_in_round_item", 0))
    per_answer = int(report.get("round_item_answers_bytes", 0)) // answers if answers else 0
    selected = int(report.get("round_item_selected_bytes", 0))
    fixed = int(report["round_item_bytes"]) - answers * per_answer - selected
    empty = fixed + selected * n // measured  # the selected list grows with the round, too
    item = empty + n * per_answer
    sizes = [empty + k * per_answer for k in range(1, n + 1)]
    fits = [s for s in sizes if s <= lim["dynamodb_item_bytes"]]  # DynamoDB refuses the rest
    today_wcu = sum(math.ceil(s / lim["dynamodb_write_unit_bytes"]) for s in fits)
    today_rcu = sum(math.ceil(s / lim["dynamodb_read_unit_bytes"]) for s in fits)  # GetItem each
    over = len(fits) + 1 if len(fits) < n else None
    # Answers in their own items (one small write each) plus one counter update on the
    # round item: 2 writes per answer, one of them on the round's hot key.
    hot_key_writes = n
    acceptance = report["phases"].get("acceptance") or 0.0
    concurrency = int(report.get("averager_concurrency", 4))
    local_handling = acceptance * concurrency / measured
    upload_bytes = int(report["bytes_up"]) / measured
    return {
        "clients": n,
        "projected_from_clients": measured,
        "round_item_bytes": item,
        "round_item_bytes_per_answer": per_answer,
        "answers_in_round_item": None
        if not answers
        else {
            "answers_before_item_limit": len(fits),
            "answers_refused_by_item_limit": n - len(fits),
            "fits_in_one_item": over is None,
            "write_units_for_answers_that_fit": today_wcu,
            "read_units_for_answers_that_fit": today_rcu,
            "hot_key_floor_seconds": today_wcu / lim["dynamodb_partition_wcu_per_s"],
            "note": "each averager event reads (GetItem) and writes (SET answers.#c) the whole "
            "round item; its write units grow with the item, and all of them land on one "
            "partition key",
        },
        "answers_as_items": {
            "hot_key_writes": hot_key_writes,
            "hot_key_floor_seconds": hot_key_writes / lim["dynamodb_partition_wcu_per_s"],
            "note": "one ~1 KB answer item per client (spread over keys) plus one atomic counter "
            "update on the round item per answer: the counter's key caps acceptance at "
            "~1,000 answers/s",
        },
        "uploads": {
            "s3_put_floor_seconds": n / lim["s3_put_per_s_per_prefix"],
            "bytes_per_update": upload_bytes,
            "note": "all updates under one 'updates/' prefix start on one partition; a burst "
            "above 3,500 PUT/s gets 503 SlowDown (retried by the SDK) until S3 splits it",
        },
        "averager": {
            "invocations": n,
            "local_seconds_per_update": local_handling,
            "lambda_concurrency_needed_for_1s_per_update_at_s3_rate": min(
                n, lim["s3_put_per_s_per_prefix"]
            ),
            "account_concurrency_default": lim["lambda_account_concurrency"],
            "seconds_to_drain_at_default_concurrency": (
                n * local_handling / lim["lambda_account_concurrency"]
                if local_handling is not None
                else None
            ),
            "note": "S3 invokes the averager asynchronously once per object; local handling "
            "time is measured with the emulator's per-table and per-bucket locks on 2 shared "
            "cores, an upper bound on Lambda's (AWS calls take ~10 ms, not the emulator's "
            "queueing)",
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--simulate-rounds", type=int, default=2)
    parser.add_argument("--skip-simulate", action="store_true")
    parser.add_argument("--timeout", type=float, default=1800, help="per load test, seconds")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument(
        "--project",
        type=int,
        nargs="*",
        default=[10000],
        help="also project these round sizes (not run) from the largest load test that finished",
    )
    parser.add_argument(
        "--reports",
        type=Path,
        nargs="*",
        default=[],
        help="also include these 'sfl loadtest --out' reports (runs made separately)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "aws_limits": AWS_LIMITS,
    }
    if not args.skip_simulate:
        with tempfile.TemporaryDirectory() as tmp:
            print("(a) 40 MNIST clients through sfl simulate", flush=True)
            results["simulate_mnist_40"] = run_simulation(args.simulate_rounds, Path(tmp))
    results["loadtest"] = []
    results["projection"] = []
    for path in args.reports:
        report = json.loads(path.read_text())
        report["command"] = f"sfl loadtest --clients {report['clients']} (run separately)"
        results["loadtest"].append(report)
        results["projection"].append(project(report))
    for n in args.sizes:
        print(f"(b) sfl loadtest --clients {n}", flush=True)
        report = run_loadtest(n, args.timeout, args.workers)
        results["loadtest"].append(report)
        if "error" not in report:
            results["projection"].append(project(report))
        else:
            done = [r for r in results["loadtest"] if "error" not in r]
            if done:  # scaled from the largest run that finished
                largest = max(done, key=lambda r: int(r["clients"]))
                results["projection"].append(project(largest, clients=n))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # keep what finished
    done = [r for r in results["loadtest"] if "error" not in r]
    projected = {p["clients"] for p in results["projection"]}
    for n in args.project:
        if done and n not in projected:
            largest = max(done, key=lambda r: int(r["clients"]))
            results["projection"].append(project(largest, clients=n))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
