"""``rounds.png``: global test accuracy and round time, one point per round."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_history(history: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = history["rounds"]
    xs = [r["round"] for r in rounds]
    fig, (acc_ax, time_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    acc = [r["accuracy"] for r in rounds]
    client_acc = [r["client_accuracy"] for r in rounds]
    acc_ax.plot(
        [0, *xs], [history["initial_accuracy"], *acc], marker="o", label="global model, test split"
    )
    acc_ax.plot(xs, client_acc, marker=".", linestyle="--", label="clients' local eval (weighted)")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(loc="lower right")
    acc_ax.set_title(f"{history['task']}: {len(rounds)} rounds")
    total = [r["timings"]["total"] or 0.0 for r in rounds]
    train = [r["timings"]["train"] or 0.0 for r in rounds]
    time_ax.bar(xs, total, color="tab:gray", label="round time")
    time_ax.bar(xs, train, color="tab:blue", label="slowest client's training")
    abandoned = [r["round"] for r in rounds if r["status"] != "CLOSED"]
    for x in abandoned:
        time_ax.axvline(x, color="tab:red", alpha=0.4)
    time_ax.set_xlabel("round")
    time_ax.set_ylabel("seconds")
    time_ax.grid(alpha=0.3)
    time_ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
