"""``sfl loadtest``: virtual clients drive a whole round through the local deployment."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sfl.cli.main import main
from sfl.learning import codec
from sfl.local.loadtest import PHASES, PrecomputedUpdates, dynamodb_item_size


def test_each_virtual_client_gets_its_own_header_over_a_shared_payload() -> None:
    base = {"w": torch.zeros(3, 2), "b": torch.ones(2)}
    payloads = PrecomputedUpdates(base, count=2, scale=0.1, seed=0)
    first = payloads.update(0, {"client_id": "vc-00000", "round": "1"})
    third = payloads.update(2, {"client_id": "vc-00002", "round": "1"})

    assert codec.parse_header(first).metadata == {"client_id": "vc-00000", "round": "1"}
    assert codec.parse_header(third).metadata == {"client_id": "vc-00002", "round": "1"}
    a, c = codec.decode(first), codec.decode(third)
    assert torch.equal(a["w"], c["w"]) and torch.equal(a["b"], c["b"])  # same payload
    assert not torch.equal(a["w"], base["w"])  # perturbed
    second = codec.decode(payloads.update(1, {"client_id": "vc-00001", "round": "1"}))
    assert not torch.equal(a["w"], second["w"])  # another payload


def test_item_size_is_counted_as_dynamodb_counts_it() -> None:
    # name bytes + value: a string's bytes; a number's 1 byte per 2 significant digits + 1;
    # a list or map 3 bytes + 1 per element (+ each map key's bytes)
    assert dynamodb_item_size({"id": {"S": "abc"}}) == 2 + 3
    assert dynamodb_item_size({"n": {"N": "12345"}}) == 1 + 3 + 1
    assert dynamodb_item_size({"n": {"N": "1200.00"}}) == 1 + 1 + 1
    assert dynamodb_item_size({"l": {"L": [{"S": "x"}, {"BOOL": True}]}}) == 1 + 3 + 2 + 2
    assert dynamodb_item_size({"m": {"M": {"k": {"NULL": True}}}}) == 1 + 3 + 1 + 1 + 1


def test_a_round_of_virtual_clients_closes_with_a_new_model(tmp_path: Path) -> None:
    out = tmp_path / "loadtest.json"

    code = main(["loadtest", "--clients", "20", "--workers", "8", "--deadline", "120",
                 "--out", str(out)])  # fmt: skip

    assert code == 0
    report = json.loads(out.read_text())
    assert report["status"] == "CLOSED"
    assert report["model_version"] == 1 and report["model_written"]
    assert report["selected"] == 20
    assert report["participants"] == report["selected"]
    assert report["upload_errors"] == 0
    assert set(report["phases"]) == set(PHASES)
    assert all(seconds is not None and seconds >= 0 for seconds in report["phases"].values())
    assert report["averager_invocations"] >= 20
    assert report["bytes_up"] > 20 * report["model_bytes"] * 0.9
    assert 0 < report["round_item_bytes"] < report["round_item_limit_bytes"]
