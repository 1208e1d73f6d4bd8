"""Benchmark: memory of the robust rules (chunked) against FedAvg (streamed), as N grows.

    .venv/bin/python benchmarks/robust_memory.py    # writes benchmarks/results/robust_memory.json

N updates of a model with ``--params`` float32 parameters are uploaded to the local S3
endpoint; then the averager's own reader (``sfl.server.round_updates.RoundUpdates``)
feeds each rule.
A sampler thread reads this process's resident memory every 5 ms while the rule runs; the
figure is the peak above the resident memory just before it. (The local S3 endpoint runs in
this process and holds the uploads, so memory before the rule already grows with N; the
difference is the rule's own.) Measured and written down, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from memory import PeakSampler, resident_bytes

from sfl.learning.codec import encode, parse_header
from sfl.learning.rules.aggregation import CHUNK_ELEMENTS, build_rule
from sfl.local.emulator import LocalAws
from sfl.server.round_updates import Entry, RoundUpdates

RESULTS = Path(__file__).parent / "results" / "robust_memory.json"


def measure(n: int, params: int, rules: list[str]) -> list[dict[str, Any]]:
    rows = []
    side = int(params**0.5)
    base = {"w": torch.zeros(side, side), "b": torch.zeros(side)}
    base_bytes = encode(base)
    base_header = parse_header(base_bytes)
    with LocalAws() as aws:
        s3 = aws.clients().s3
        s3.create_bucket(Bucket="updates")
        entries = []
        generator = torch.Generator().manual_seed(n)
        for i in range(n):
            update = {k: torch.randn(v.shape, generator=generator) for k, v in base.items()}
            put = s3.put_object(Bucket="updates", Key=f"u{i}", Body=encode(update))
            entries.append(Entry(f"c{i}", f"u{i}", put["ETag"].strip('"'), 1.0))
            del update
        for name in rules:
            rule = build_rule(name)
            before = resident_bytes()
            started = time.perf_counter()
            with (
                RoundUpdates(s3, "updates", entries, base, base_header) as updates,
                PeakSampler(interval=0.005) as sampler,
            ):
                result = rule.aggregate(base, updates, None)
            seconds = time.perf_counter() - started
            assert result is not None
            row = {
                "rule": name,
                "updates": n,
                "parameters": side * side + side,
                "update_mib": round(len(base_bytes) / 2**20, 2),
                "seconds": round(seconds, 2),
                "peak_above_before_mib": round((sampler.peak - before) / 2**20, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
            del result
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--updates", type=int, nargs="+", default=[10, 40, 100])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--rules", nargs="+", default=["fedavg", "median", "krum"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    for n in args.updates:
        rows.extend(measure(n, args.params, args.rules))
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "chunk_elements": CHUNK_ELEMENTS,
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
