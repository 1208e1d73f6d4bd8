"""``sfl report --out DIR``: the federation's history as ``history.json`` and charts.

Cost per round is an estimate from what each round record counts (requests, bytes,
aggregation time) at list prices (``PRICES``, us-east-1, USD); the bill is the truth.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sfl.ops import views
from sfl.ops.actions import config_history
from sfl.ops.federation import AVERAGER_OUTPUT, Federation

PRICES = {
    "lambda_request": 0.20 / 1e6,
    "lambda_gb_second": 0.0000166667,
    "s3_put": 0.005 / 1000,
    "s3_get": 0.0004 / 1000,
    "dynamodb_write": 0.625 / 1e6,
    "dynamodb_read": 0.125 / 1e6,
}
#: Seconds an averager invocation takes to judge one upload (header, checks, two writes).
JUDGE_SECONDS = 0.3


def round_cost(row: dict[str, Any], averager_memory_mb: int) -> dict[str, float]:
    """An estimate of one round's AWS cost (USD) and what it counts."""
    uploads = row["answered"] + row["other_uploads"]
    invocations = uploads + 2  # one per upload, the initiator, the aggregation's share
    gb = averager_memory_mb / 1024
    seconds = uploads * JUDGE_SECONDS + float(row.get("aggregate_seconds") or 0.0)
    s3_puts = uploads + 3  # updates, the model, its lineage, the assignment
    s3_gets = row["selected"] + 2 * row["accepted"] + 1  # downloads, judge + aggregate, base
    ddb_writes = 3 * uploads + 4
    cost = (
        invocations * PRICES["lambda_request"]
        + seconds * gb * PRICES["lambda_gb_second"]
        + s3_puts * PRICES["s3_put"]
        + s3_gets * PRICES["s3_get"]
        + ddb_writes * PRICES["dynamodb_write"]
        + (uploads + 4) * PRICES["dynamodb_read"]
    )
    return {
        "usd": cost,
        "lambda_invocations": invocations,
        "lambda_gb_seconds": seconds * gb,
        "s3_puts": s3_puts,
        "s3_gets": s3_gets,
        "dynamodb_writes": ddb_writes,
    }


#: What ``sfl report``'s ``history.json`` holds (docs/history-json.md); the number grows when
#: a field changes meaning or goes, not when one is added.
REPORT_SCHEMA = "sfl-report-history/1"


def build_history(fed: Federation) -> dict[str, Any]:
    memory = 128
    function = fed.outputs.get(AVERAGER_OUTPUT)
    if function:
        memory = int(
            fed.client("lambda").get_function_configuration(FunctionName=function)["MemorySize"]
        )
    now = time.time()
    rows = [views.round_row(r, now) for r in views.rounds_of(fed)]
    for row in rows:
        row["cost"] = round_cost(row, memory)
    return {
        "schema": REPORT_SCHEMA,
        "stack": fed.stack,
        "experiment": fed.experiment,
        "generated_at": now,
        "deployed_config": fed.deployed_config.to_dict(),
        "config_versions": config_history(fed),
        "averager_memory_mb": memory,
        "prices_usd": PRICES,
        "rounds": rows,
        "models": views.models(fed, None),
    }


def write_report(fed: Federation, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    history = build_history(fed)
    (out / "history.json").write_text(json.dumps(history, indent=2, default=str) + "\n")
    charts = plot(history, out)
    return {
        "history": str(out / "history.json"),
        "charts": [str(p) for p in charts],
        "rounds": len(history["rounds"]),
    }


def plot(history: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = history["rounds"]
    xs = [r["round"] for r in rows]
    charts: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=90)
        plt.close(fig)
        charts.append(path)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(xs, [r["accuracy"] for r in rows], marker="o", label="global model, held-out set")
    ax.plot(
        xs, [r["client_accuracy"] for r in rows], marker=".", ls="--", label="clients (weighted)"
    )
    ax.set(xlabel="round", ylabel="accuracy", ylim=(0, 1.02), title="accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save(fig, "accuracy.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(xs, [r["duration_seconds"] for r in rows], color="tab:gray", label="round")
    ax.bar(xs, [r["aggregate_seconds"] or 0 for r in rows], color="tab:blue", label="aggregation")
    for r in rows:
        if r["status"] == "ABANDONED":
            ax.axvline(r["round"], color="tab:red", alpha=0.4)
    ax.set(xlabel="round", ylabel="seconds", title="round time (red: abandoned)")
    ax.legend(loc="upper right")
    save(fig, "round_time.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(xs, [r["selected"] for r in rows], marker="o", label="selected")
    ax.plot(xs, [r["accepted"] for r in rows], marker="o", label="accepted")
    ax.plot(xs, [r["candidates"] for r in rows], ls=":", label="active at start")
    ax.set(xlabel="round", ylabel="clients", title="participation")
    ax.legend(loc="lower right")
    save(fig, "participation.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    reasons = sorted({k for r in rows for k in r["rejections"]})
    bottom = [0] * len(rows)
    for reason in reasons:
        values = [r["rejections"].get(reason, 0) for r in rows]
        ax.bar(xs, values, bottom=bottom, label=reason)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set(xlabel="round", ylabel="uploads", title="rejections by reason")
    if reasons:
        ax.legend(loc="upper right")
    save(fig, "rejections.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(xs, [r["cost"]["usd"] * 100 for r in rows], color="tab:green")
    ax.set(xlabel="round", ylabel="US cents (estimate)", title="cost per round (list prices)")
    save(fig, "cost.png")
    return charts
