"""The operator's everyday reads ask the same of DynamoDB and S3 whatever the history's length.

A federation stack registered on the local endpoint as ``sfl local up`` registers one (its
functions' configuration, its outputs), then synthetic history written straight into its
rounds table and models bucket. Every request ``sfl status``, ``rounds``, ``devices``,
``models list`` and one look of ``watch`` make is counted through botocore's events, with
the items each returns: the counts at one history length equal those at four times it.
(What a request costs the emulator still grows with the table: moto's Query walks every
item of it. benchmarks/operator_reads.py measures the times.)
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from sfl.cli.main import main
from sfl.core import layout
from sfl.local.lambdas import LocalFunction
from sfl.ops import views
from sfl.ops.federation import INITIATOR_OUTPUT, LOCAL_OUTPUT, OUTPUT_NAMES, Federation
from sfl.state.dynamo import to_item
from sfl.state.lineage import ModelLineage
from sfl.state.rounds import Answer, Outcome, Round, RoundState, RoundStore
from sfl.state.rounds.keys import NEWEST_ATTRIBUTE, newest_key, slot_key
from tests.conftest import TINY_MODEL, Stack

STACK = "Sfl-ReadsTest"
# The windows the commands read, small so that a short history already outgrows them.
WINDOW = 3
COMMANDS = {
    "status": ["status"],
    "rounds": ["rounds", "--last", str(WINDOW)],
    "devices": ["devices"],
    "models list": ["models", "list", "--last", str(WINDOW)],
    "watch": ["watch", "--timeout", "0.01", "--history", "2"],
}
DEVICES = ("dev-a", "dev-b")


@dataclass
class Reachable:
    """A provisioned local stack and the CloudFormation stack name ``sfl`` finds it by."""

    stack: Stack
    name: str


@pytest.fixture
def federation(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Reachable]:
    """``stack`` findable by ``sfl --endpoint``: its initiator function (whose environment is
    the deployed configuration) and a CloudFormation stack with the federation's outputs."""
    monkeypatch.setenv("SFL_STATE_DIR", str(tmp_path))  # no running 'sfl local up' is found
    monkeypatch.setattr(views, "STATUS_ROUNDS", 2 * WINDOW)
    monkeypatch.setattr(views, "DEVICE_ROUNDS", WINDOW)
    suffix = stack.names.rounds_table[-8:]  # the resources' own: unique in this session
    iam = stack.aws.client("iam")
    role = iam.create_role(RoleName=f"{STACK}-{suffix}", AssumeRolePolicyDocument="{}")
    function = f"{STACK}-initiator-{suffix}"
    stack.aws.client("lambda").create_function(
        FunctionName=function,
        Runtime="python3.12",
        Role=role["Role"]["Arn"],
        Handler="handler.lambda_handler",
        Code={"ZipFile": _empty_zip()},
        Environment={"Variables": stack.names.to_env() | stack.config.to_env()},
    )
    outputs = {o: getattr(stack.names, attr) for attr, o in OUTPUT_NAMES.items()}
    outputs |= {INITIATOR_OUTPUT: function, LOCAL_OUTPUT: "true"}
    template = {
        "Resources": {
            "Marker": {
                "Type": "AWS::SSM::Parameter",
                "Properties": {"Name": f"/{function}", "Type": "String", "Value": "x"},
            }
        },
        "Outputs": {k: {"Value": v} for k, v in outputs.items()},
    }
    cloudformation = stack.aws.client("cloudformation")
    name = function.replace("-initiator", "")
    cloudformation.create_stack(StackName=name, TemplateBody=json.dumps(template))
    stack.register(*DEVICES)
    yield Reachable(stack, name)
    cloudformation.delete_stack(StackName=name)


def _empty_zip() -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("README.txt", "not run\n")
    return archive.getvalue()


def write_history(stack: Stack, first: int, last: int) -> None:
    """Rounds ``first``..``last`` closed, each with its slots, model version and lineage;
    dev-a rejected in every third round, dev-b declining in the round after."""
    table = stack.names.rounds_table
    experiment = stack.config.experiment
    items: list[dict[str, Any]] = []
    for number in range(first, last + 1):
        now = time.time()
        answers = {
            "dev-a": Outcome.REJECTED if number % WINDOW == 0 else Outcome.ACCEPTED,
            "dev-b": Outcome.DECLINED if number % WINDOW == 1 else Outcome.ACCEPTED,
        }
        r = Round(
            experiment=experiment, round=number, status=RoundState.CLOSED,
            base_version=number - 1, selected=DEVICES, created_at=now - 5, deadline_at=now + 60,
            train_config={"lr": 0.05}, selected_count=2, answered_count=2,
            accepted_count=sum(o is Outcome.ACCEPTED for o in answers.values()),
            rejected_count=sum(o is Outcome.REJECTED for o in answers.values()),
            declined_count=sum(o is Outcome.DECLINED for o in answers.values()),
        )  # fmt: skip
        closed = {"model_version": number, "finished_at": now, "evaluation": {"accuracy": 0.9}}
        items.append(r.to_item() | to_item(closed))
        for client, outcome in answers.items():
            refused = outcome is not Outcome.ACCEPTED
            answer = Answer(
                outcome=outcome,
                key=layout.update_key(client, number),
                reason=f"{outcome.value}_why: detail" if refused else "",
                received_at=now,
            )
            # The slot as ``RoundStore.write_slots`` and ``record_answer`` leave it.
            slot = {"client_id": client, "answer": answer.to_dict(), "outcome": outcome.value}
            items.append(slot_key(experiment, number, client) | to_item(slot))
        stack.clients.s3.put_object(
            Bucket=stack.names.models_bucket, Key=layout.model_key(number), Body=b"synthetic"
        )
        lineage = ModelLineage(version=number, kind="round", parent=number - 1, round=number)
        stack.clients.s3.put_object(
            Bucket=stack.names.models_bucket,
            Key=layout.lineage_key(number),
            Body=json.dumps(lineage.to_dict()),
        )
    # What ``RoundStore.create`` writes with each round: the newest round's number.
    items.append(newest_key(experiment) | {NEWEST_ATTRIBUTE: {"N": str(last)}})
    for start in range(0, len(items), 25):
        batch = [{"PutRequest": {"Item": item}} for item in items[start : start + 25]]
        assert not stack.clients.dynamodb.batch_write_item(RequestItems={table: batch}).get(
            "UnprocessedItems"
        )


def reads(
    federation: Reachable, argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[Counter[str], Any]:
    """Run ``sfl ARGV --json``: its requests and the items they read, by operation
    (``Query``, ``Query items``, ...), and what it printed."""
    seen: Counter[str] = Counter()

    def count(event_name: str, parsed: dict[str, Any], **_: Any) -> None:
        operation = event_name.split(".")[-1]
        seen[operation] += 1
        if "ScannedCount" in parsed:
            seen[f"{operation} items"] += int(parsed["ScannedCount"])
        elif "Responses" in parsed:
            seen[f"{operation} items"] += sum(len(v) for v in parsed["Responses"].values())

    original = Federation.client

    def counted_client(self: Federation, service: str) -> Any:
        fresh = service not in self._clients
        client = original(self, service)
        if fresh:
            client.meta.events.register("after-call", count)
        return client

    monkeypatch.setattr(Federation, "client", counted_client)
    out, err = io.StringIO(), io.StringIO()
    where = ["--endpoint", federation.stack.aws.endpoint_url, "--stack", federation.name]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*argv, "--json", *where])
    monkeypatch.setattr(Federation, "client", original)
    if argv[0] == "watch":  # one look, then its timeout: exit code 1, a line per round
        assert code == 1, err.getvalue()
        return seen, [json.loads(line) for line in out.getvalue().splitlines()]
    assert code == 0, err.getvalue()
    return seen, json.loads(out.getvalue())


def test_each_command_reads_the_same_at_any_history_length(
    federation: Reachable, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = 3 * WINDOW
    write_history(federation.stack, 1, short)
    before = {name: reads(federation, argv, monkeypatch) for name, argv in COMMANDS.items()}
    write_history(federation.stack, short + 1, 4 * short)
    after = {name: reads(federation, argv, monkeypatch) for name, argv in COMMANDS.items()}
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    reads_before = {k: v[0] for k, v in before.items()}
    # Each reads its window by key, not the history, and queries nothing but a refused
    # round's slots: the newest round's number (a GetItem), its window (one BatchGetItem,
    # with the round after the newest), a HEAD and a GET per version shown.
    assert reads_before["rounds"] == Counter(
        {
            "GetFunctionConfiguration": 1,
            "GetItem": 1,
            "BatchGetItem": 1,
            "BatchGetItem items": WINDOW,
        }
    )
    # watch: its --history 2 finished rounds and two more (the open round, and one that may
    # finish meanwhile).
    assert reads_before["watch"] == reads_before["rounds"] + Counter({"BatchGetItem items": 1})
    assert reads_before["status"]["Query"] == 0
    assert reads_before["status"]["BatchGetItem"] == 1
    assert reads_before["status"]["BatchGetItem items"] == 2 * WINDOW
    assert reads_before["models list"]["Query"] == 0
    assert reads_before["models list"]["HeadObject"] == WINDOW + 1
    assert reads_before["models list"]["GetObject"] == WINDOW
    # Rounds 7..9: dev-b declined in round 7, dev-a was rejected in round 9: their slots.
    assert reads_before["devices"]["Query"] == 2
    assert reads_before["devices"]["BatchGetItem items"] == WINDOW
    # The S3 client is made only by the command that reads the models bucket.
    assert not any(k.endswith("Object") for name, c in reads_before.items() for k in c
                   if name != "models list")  # fmt: skip


def test_what_the_commands_show_is_the_newest_window(
    federation: Reachable, monkeypatch: pytest.MonkeyPatch
) -> None:
    newest = 4 * WINDOW
    write_history(federation.stack, 1, newest)
    shown = {name: reads(federation, argv, monkeypatch)[1] for name, argv in COMMANDS.items()}
    status = shown["status"]
    assert status["rounds_total"] == newest and status["round"]["round"] == newest
    assert status["rounds_counted"] == status["rounds_closed"] == 2 * WINDOW
    assert status["latest_model"]["version"] == newest
    assert [r["round"] for r in shown["rounds"]] == list(range(newest - WINDOW + 1, newest + 1))
    assert [m["version"] for m in shown["models list"]] == list(
        range(newest - WINDOW + 1, newest + 1)
    )
    # Rounds 10..12: dev-a rejected in round 12, dev-b declined in round 10.
    devices = {d["client_id"]: d for d in shown["devices"]}
    assert devices["dev-a"]["rejected"] == {"rejected_why": 1}
    assert devices["dev-a"]["declined"] == {}
    assert devices["dev-b"]["declined"] == {"declined_why": 1}
    assert devices["dev-b"]["rejected"] == {}
    assert [r["round"] for r in shown["watch"]] == [newest - 1, newest]


def test_the_initiator_names_each_round_it_starts_the_newest(stack: Stack) -> None:
    """The initiator handler starts five rounds (each abandoned in turn, as a deadline
    would): the item naming the newest round says 5, and the newest rounds read by key are
    the ones a query of the whole partition finds."""
    stack.put_model(0, TINY_MODEL)
    stack.register(*DEVICES)
    initiator = LocalFunction("initiator")
    store = RoundStore(stack.clients.dynamodb, stack.names.rounds_table)
    experiment = stack.config.experiment
    assert store.newest_number(experiment) is None
    for number in range(1, 5):
        assert initiator.invoke({})["round"] == number
        assert store.abandon(experiment, number, "deadline passed", time.time())
    assert initiator.invoke({})["round"] == 5
    assert store.begin_aggregation(experiment, 5, "averager", time.time(), 60) is not None
    summary = {"participants": 2, "client_accuracy": 0.8, "clipped": list(DEVICES)}
    assert store.close(experiment, 5, "averager", 1, time.time(), summary)

    assert store.newest_number(experiment) == 5
    newest = store.recent(experiment, 3)
    assert [r.round for r in newest] == [3, 4, 5]
    assert newest == store.history(experiment, slots=False)[-3:]
    assert [o.round for o in store.recent_outcomes(experiment, 10)] == [5, 4, 3, 2, 1]
    # What ``sfl rounds`` shows of them, read with only the attributes it shows.
    shown = store.recent(experiment, 3, attributes=views.ROW_ATTRIBUTES)
    now = time.time()
    assert [views.round_row(r, now) for r in shown] == [views.round_row(r, now) for r in newest]
    assert shown[-1].summary == {"participants": 2, "client_accuracy": 0.8}


def test_rounds_made_without_naming_the_newest_are_still_read(stack: Stack) -> None:
    """A round item written by code from before the newest-round item (an upgrade while a
    round was starting): reads by key notice the round after the one named and query."""
    store = RoundStore(stack.clients.dynamodb, stack.names.rounds_table)
    experiment = stack.config.experiment
    first = Round(
        experiment=experiment, round=1, status=RoundState.ABANDONED, base_version=0,
        selected=DEVICES, created_at=time.time(), deadline_at=time.time() + 60,
        train_config={"lr": 0.05},
    )  # fmt: skip
    assert store.create(replace(first, status=RoundState.OPEN), None)
    assert store.abandon(experiment, 1, "deadline passed", time.time())
    stack.clients.dynamodb.put_item(
        TableName=stack.names.rounds_table, Item=replace(first, round=2).to_item()
    )

    assert store.newest_number(experiment) == 1
    assert [r.round for r in store.recent(experiment, 5)] == [1, 2]
    assert store.by_key(experiment, 5) is None
