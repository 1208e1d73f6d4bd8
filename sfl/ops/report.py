"""``sfl report --out DIR``: the federation's history as ``history.json`` and charts.

Cost per round is the estimate each round's close recorded (``sfl.core.cost``: what the
round counted, at the region's list prices); the bill is the truth.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sfl.ops import views
from sfl.ops.actions import config_history
from sfl.ops.federation import Federation

#: What ``sfl report``'s ``history.json`` holds (docs/history-json.md); the number grows when
#: a field changes meaning or goes, not when one is added. 2: a round's ``cost`` is the one its
#: close recorded (``sfl.core.cost``), no longer a second estimate made here.
REPORT_SCHEMA = "sfl-report-history/2"


def recorded_cost(record_summary: Mapping[str, Any]) -> dict[str, Any]:
    """The cost a round's close recorded (region prices, what the round counted); a round
    with none (abandoned, or closed before rounds were priced) says so instead of a number."""
    cost = record_summary.get("cost")
    if isinstance(cost, dict):
        return cost
    return {"usd": None, "unpriced": "no cost recorded for this round (abandoned or older)"}


def build_history(fed: Federation) -> dict[str, Any]:
    now = time.time()
    records = views.rounds_of(fed)
    rows = [views.round_row(r, now) for r in records]
    for row, record in zip(rows, records, strict=True):
        row["cost"] = recorded_cost(record.summary)
    return {
        "schema": REPORT_SCHEMA,
        "stack": fed.stack,
        "experiment": fed.experiment,
        "generated_at": now,
        "deployed_config": fed.deployed_config.to_dict(),
        "config_versions": config_history(fed),
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
    ax.bar(xs, [(r["cost"]["usd"] or 0.0) * 100 for r in rows], color="tab:green")
    ax.set(xlabel="round", ylabel="US cents (estimate)", title="cost per round (list prices)")
    save(fig, "cost.png")
    return charts
