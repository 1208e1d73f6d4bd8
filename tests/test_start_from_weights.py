"""A federation starts from the user's own weights (``sfl models init --from FILE``).

A local fleet (``sfl local up``'s, one client, no scheduled round) plays the deployed stack:
the stack wrote version 0 from the task's seed when it came up. The user's state dict, with
values the test chose, becomes version 0 exactly; a file that does not fit the task's model
is refused with its differences, a pickle that is more than weights is refused without
running it, and once a round has started nothing replaces version 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from sfl.cli.main import main
from sfl.core import layout
from sfl.learning import codec
from sfl.learning.tasks import load_task
from sfl.local.fleet import FleetOptions, LocalFleet
from sfl.state.lineage import LineageStore

STACK = "Sfl-StartFromWeights"  # moto's backends are per process: a name of its own
pytestmark = pytest.mark.slow


class RunsCode:
    """What a malicious checkpoint holds: unpickling it would call ``Path.touch``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def known_weights() -> dict[str, torch.Tensor]:
    """The digits model's state dict with values no seed would give: a ramp per tensor."""
    reference = load_task("digits").build_model(seed=0).state_dict()
    return {
        name: torch.linspace(-1.0, 1.0, t.numel(), dtype=t.dtype).reshape(t.shape) + i
        for i, (name, t) in enumerate(reference.items())
    }


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    out = tmp_path_factory.mktemp("fleet")
    options = FleetOptions(
        out=out, clients=1, schedule_seconds=3600.0, tick_seconds=0.5, stack=STACK
    )
    with LocalFleet(options) as running:
        yield running


def sfl(fleet: LocalFleet, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*argv, "--endpoint", fleet.endpoint_url, "--stack", STACK])
    return code, out.getvalue(), err.getvalue()


def version_0(fleet: LocalFleet) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    s3 = fleet.federation.aws.clients().s3
    body = s3.get_object(Bucket=fleet.federation.names.models_bucket, Key=layout.model_key(0))
    data = body["Body"].read()
    return codec.decode(data), dict(codec.parse_header(data).metadata)


def test_version_0_written_at_deploy_is_replaced_only_when_asked(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    path = tmp_path / "pretrained.pt"
    torch.save(known_weights(), path)
    code, _, err = sfl(fleet, "models", "init", "--from", str(path))
    assert code == 1
    assert "version 0 exists already" in err and "--replace" in err
    tensors, _ = version_0(fleet)
    assert not torch.equal(tensors["0.weight"], known_weights()["0.weight"])


def test_the_users_state_dict_becomes_version_0_exactly(fleet: LocalFleet, tmp_path: Path) -> None:
    path = tmp_path / "pretrained.pt"
    torch.save(known_weights(), path)
    code, out, err = sfl(fleet, "models", "init", "--from", str(path), "--replace")
    assert code == 0, err
    assert "model version 0 is now pretrained.pt" in out

    tensors, metadata = version_0(fleet)
    expected = known_weights()
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        assert torch.equal(tensors[name], value), name
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    assert metadata["version"] == "0" and metadata["source_sha256"] == sha256
    lineage = LineageStore(fleet.federation.aws.clients(), fleet.federation.names).get(0)
    assert lineage is not None and lineage.kind == "initial"
    assert lineage.source == {"source_file": "pretrained.pt", "source_sha256": sha256}


def test_a_safetensors_file_is_read_too(fleet: LocalFleet, tmp_path: Path) -> None:
    weights = {name: value * 2 for name, value in known_weights().items()}
    path = tmp_path / "pretrained.safetensors"
    save_file(weights, str(path))
    code, _, err = sfl(fleet, "models", "init", "--from", str(path), "--replace")
    assert code == 0, err
    tensors, _ = version_0(fleet)
    assert all(torch.equal(tensors[name], value) for name, value in weights.items())


def test_weights_of_another_model_are_refused_with_the_differences(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    before, _ = version_0(fleet)
    weights = known_weights()
    del weights["0.bias"]
    weights["2.weight"] = torch.zeros(8, 16, 3, 3)
    weights["head.weight"] = torch.zeros(3)
    weights["6.weight"] = weights["6.weight"].double()
    path = tmp_path / "other.pt"
    torch.save(weights, path)
    code, _, err = sfl(fleet, "models", "init", "--from", str(path), "--replace")
    assert code == 1
    assert "other.pt does not fit the task's model (4 differences)" in err
    assert "missing 0.bias ((16,) float32)" in err
    assert "unexpected head.weight" in err
    assert "2.weight: shape (8, 16, 3, 3), the model's is (32, 16, 3, 3)" in err
    assert "6.weight: dtype float64, the model's is float32" in err
    after, _ = version_0(fleet)
    assert all(torch.equal(after[name], value) for name, value in before.items())


def test_a_pickle_that_is_more_than_weights_is_refused_unrun(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    touched = tmp_path / "code-ran"
    weights: dict[str, Any] = dict(known_weights())
    weights["0.weight"] = RunsCode(touched)
    path = tmp_path / "checkpoint.pt"
    torch.save(weights, path)
    code, _, err = sfl(fleet, "models", "init", "--from", str(path), "--replace")
    assert code == 1
    assert "checkpoint.pt: refused: it holds more than weights" in err
    assert "weights_only=True" in err
    assert not touched.exists()


def test_once_a_round_has_started_version_0_stays(fleet: LocalFleet, tmp_path: Path) -> None:
    deadline = time.time() + 60
    while True:  # the fleet's one client has registered: a round can start
        code, out, _ = sfl(fleet, "start-round", "--json")
        if code == 0 and json.loads(out).get("started"):
            break
        assert time.time() < deadline, out
        time.sleep(0.5)
    path = tmp_path / "late.pt"
    torch.save(known_weights(), path)
    code, _, err = sfl(fleet, "models", "init", "--from", str(path), "--replace")
    assert code == 1
    assert "round 1 of experiment 'default' has started already" in err


def test_initial_model_writes_the_users_weights_to_a_file(tmp_path: Path) -> None:
    path, out = tmp_path / "pretrained.pt", tmp_path / "v0.safetensors"
    torch.save(known_weights(), path)
    assert main(["initial-model", "--task", "digits", "--from", str(path), "--out", str(out)]) == 0
    tensors = codec.decode(out.read_bytes())
    assert all(torch.equal(tensors[n], v) for n, v in known_weights().items())
    other = tmp_path / "mlp.pt"
    torch.save(load_task("digits_mlp").build_model(seed=0).state_dict(), other)
    assert main(["initial-model", "--task", "digits", "--from", str(other), "--out", str(out)]) == 2


def test_simulate_init_from_starts_the_run_from_the_users_weights(tmp_path: Path) -> None:
    """``sfl simulate --init-from FILE``: the run's version 0 is the file's model, so its
    initial score is that model's, not the seeded one's; a misfit file stops it before set-up."""
    from sfl.learning.tasks.base import TrainConfig

    task = load_task("digits")
    data = task.load_central_data()
    mine = task.build_model(seed=7)  # pretrained: the user's own start, far from chance
    task.train(mine, data.train, TrainConfig(local_epochs=1, lr=0.05, batch_size=16))
    save_file(mine.state_dict(), tmp_path / "mine.safetensors")
    test = data.test
    expected = task.evaluate(mine, test).accuracy
    seeded = task.evaluate(task.build_model(seed=0), test).accuracy
    assert expected > seeded + 0.3  # the check below can tell them apart

    out = tmp_path / "run"
    args = ["simulate", "--clients", "2", "--rounds", "1", "--out", str(out)]
    assert main([*args, "--init-from", str(tmp_path / "mine.safetensors")]) == 0
    history = json.loads((out / "history.json").read_text())
    assert history["initial_accuracy"] == pytest.approx(expected)

    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    assert main([*args, "--init-from", str(tmp_path / "other.safetensors")]) == 2
