"""Flower's own strategies on given inputs: the oracle for ``tests/test_flwr_parity.py``.

Runs in its own virtualenv (``.venv-flwr``, made by ``scripts/flwr_oracle.sh``): Flower's
pins clash with the project's. Reads ``spec.json`` and ``inputs.npz`` (no pickle), runs
``aggregate_fit`` round after round on one strategy object, and writes each round's model to
``outputs.npz``.

    python flwr_aggregate.py spec.json inputs.npz outputs.npz
"""

from __future__ import annotations

import json
import sys

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import strategy


def build(name: str, params: dict, initial: list[np.ndarray]) -> strategy.Strategy:
    start = ndarrays_to_parameters(initial)
    if name == "fedavg":
        return strategy.FedAvg(initial_parameters=start)
    if name == "fedavgm":
        return strategy.FedAvgM(
            initial_parameters=start,
            server_learning_rate=params["server_lr"],
            server_momentum=params["server_momentum"],
        )
    if name in ("fedadam", "fedyogi"):
        cls = strategy.FedAdam if name == "fedadam" else strategy.FedYogi
        return cls(
            initial_parameters=start,
            eta=params["eta"],
            beta_1=params["beta_1"],
            beta_2=params["beta_2"],
            tau=params["tau"],
        )
    if name == "fedadagrad":
        return strategy.FedAdagrad(initial_parameters=start, eta=params["eta"], tau=params["tau"])
    if name == "median":
        return strategy.FedMedian(initial_parameters=start)
    if name == "trimmed_mean":
        return strategy.FedTrimmedAvg(initial_parameters=start, beta=params["trim_fraction"])
    if name == "krum":
        return strategy.Krum(
            initial_parameters=start,
            num_malicious_clients=params["byzantine"],
            num_clients_to_keep=params["keep"],
        )
    raise SystemExit(f"unknown strategy {name!r}")


def main(spec_path: str, inputs_path: str, outputs_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    inputs = np.load(inputs_path, allow_pickle=False)
    tensors = spec["tensors"]
    initial = [inputs[f"base/{t}"] for t in range(tensors)]
    rule = build(spec["strategy"], spec["params"], initial)
    outputs: dict[str, np.ndarray] = {}
    for r in range(1, spec["rounds"] + 1):
        examples = inputs[f"round{r}/num_examples"]
        results = []
        for c in range(spec["clients"]):
            arrays = [inputs[f"round{r}/client{c}/{t}"] for t in range(tensors)]
            fit = FitRes(
                status=Status(code=Code.OK, message=""),
                parameters=ndarrays_to_parameters(arrays),
                num_examples=int(examples[c]),
                metrics={},
            )
            results.append((None, fit))
        parameters, _ = rule.aggregate_fit(r, results, [])
        for t, array in enumerate(parameters_to_ndarrays(parameters)):
            outputs[f"round{r}/{t}"] = array
    np.savez(outputs_path, **outputs)


if __name__ == "__main__":
    main(*sys.argv[1:4])
