"""The round machinery: the two Lambdas, their schedule, failure handling, the bootstrap call.

Also the initiator's packaging: a torch-free zip built on this machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest
from aws_cdk import Stack, assertions
from stack_template import (
    REPO_ROOT,
    Synthesized,
    actions_of,
    arn_of,
    bare_app_stack,
    logical_id,
    resource_json,
)

from infra.bundling import BundlingError, bundle, core_modules, read_pins
from infra.rounds import FederationRounds, FunctionSettings
from sfl.core.events import BOOTSTRAP_EVENT, TICK_EVENT
from sfl.server.runtime import INITIATOR_FUNCTION_ENV

ENVIRONMENT = {"SFL_MODELS_BUCKET": "models", "SFL_LR": "0.05"}


def build(
    stack: Stack, *, initiator_reserved: int = 0, schedule_enabled: bool = True
) -> FederationRounds:
    return FederationRounds(
        stack,
        "Rounds",
        source_root=REPO_ROOT,
        python_version="3.14",
        environment=ENVIRONMENT,
        initiator=FunctionSettings(
            memory_mb=256, timeout_seconds=60, reserved_concurrency=initiator_reserved
        ),
        averager=FunctionSettings(memory_mb=2048, timeout_seconds=300, reserved_concurrency=0),
        schedule_minutes=7,
        schedule_enabled=schedule_enabled,
        log_retention_days=14,
    )


@pytest.fixture(scope="module")
def rounds() -> tuple[FederationRounds, assertions.Template, dict[str, Any]]:
    stack = bare_app_stack("RoundsUnderTest")
    construct = build(stack)
    template = assertions.Template.from_stack(stack)
    return construct, template, template.to_json()


# --- the functions ---------------------------------------------------------------------------


def test_initiator_is_a_python_zip_with_the_configured_size(rounds):
    construct, _, template_json = rounds
    props = resource_json(template_json, construct.initiator)["Properties"]
    assert props["Runtime"] == "python3.14"
    assert props["Handler"] == "handler.lambda_handler"
    assert props["Architectures"] == ["arm64"]
    assert props["Code"]["S3Key"].endswith(".zip")
    assert props["MemorySize"] == 256
    assert props["Timeout"] == 60
    assert "ReservedConcurrentExecutions" not in props


def test_averager_is_a_container_image_with_the_configured_size(rounds):
    construct, _, template_json = rounds
    props = resource_json(template_json, construct.averager)["Properties"]
    assert props["PackageType"] == "Image"
    assert "ImageUri" in props["Code"]
    assert props["Architectures"] == ["x86_64"]
    assert props["MemorySize"] == 2048
    assert props["Timeout"] == 300


def test_both_functions_get_the_environment_and_powertools_names(rounds):
    construct, _, template_json = rounds
    for function, service in (
        (construct.initiator, "sfl-initiator"),
        (construct.averager, "sfl-averager"),
    ):
        env = resource_json(template_json, function)["Properties"]["Environment"]["Variables"]
        assert env["SFL_MODELS_BUCKET"] == "models"
        assert env["SFL_LR"] == "0.05"
        assert env["POWERTOOLS_SERVICE_NAME"] == service
        assert env["POWERTOOLS_METRICS_NAMESPACE"] == "ServerlessFederatedLearning"


def test_averager_knows_the_initiator_by_name(rounds):
    construct, _, template_json = rounds
    env = resource_json(template_json, construct.averager)["Properties"]["Environment"]["Variables"]
    assert env[INITIATOR_FUNCTION_ENV] == {"Ref": logical_id(construct.initiator)}


def test_reserved_concurrency_is_set_only_when_configured(bare_stack):
    construct = build(bare_stack, initiator_reserved=2)
    template_json = assertions.Template.from_stack(bare_stack).to_json()
    props = resource_json(template_json, construct.initiator)["Properties"]
    assert props["ReservedConcurrentExecutions"] == 2
    skips = resource_json(template_json, construct.initiator)["Metadata"]["checkov"]["skip"]
    assert "CKV_AWS_115" not in {s["id"] for s in skips}


def test_each_function_logs_to_its_own_group_with_retention(rounds):
    construct, _, template_json = rounds
    for function, log_group in (
        (construct.initiator, construct.initiator_log_group),
        (construct.averager, construct.averager_log_group),
    ):
        props = resource_json(template_json, function)["Properties"]
        assert props["LoggingConfig"] == {"LogGroup": {"Ref": logical_id(log_group)}}
        group = resource_json(template_json, log_group)
        assert group["Properties"]["RetentionInDays"] == 14
        assert group["DeletionPolicy"] == "Delete"


def test_execution_roles_start_with_logs_only_and_no_managed_policy(rounds):
    construct, _, template_json = rounds
    for function, log_group in (
        (construct.initiator, construct.initiator_log_group),
        (construct.averager, construct.averager_log_group),
    ):
        role = resource_json(template_json, function.role)
        assert "ManagedPolicyArns" not in role["Properties"]
        assert role["Properties"]["AssumeRolePolicyDocument"]["Statement"] == [
            {
                "Action": "sts:AssumeRole",
                "Effect": "Allow",
                "Principal": {"Service": "lambda.amazonaws.com"},
            }
        ]
        policy_id = logical_id(function.role.node.find_child("DefaultPolicy"))
        statements = template_json["Resources"][policy_id]["Properties"]["PolicyDocument"][
            "Statement"
        ]
        by_actions = {tuple(actions_of(s)): s["Resource"] for s in statements}
        assert by_actions[("logs:CreateLogStream", "logs:PutLogEvents")] == arn_of(
            logical_id(log_group)
        )
        queue_arn = arn_of(logical_id(construct.failure_queue))
        # Lambda delivers a failed event with SendMessage; nothing else on the queue.
        assert by_actions[("sqs:SendMessage",)] == queue_arn
        # Active tracing: X-Ray's writes, which take no resource but "*".
        assert by_actions[("xray:PutTelemetryRecords", "xray:PutTraceSegments")] == "*"
        assert len(statements) == 3  # everything else is granted by the stack


# --- failures, schedule, bootstrap -----------------------------------------------------------


def test_failed_async_invocations_go_to_the_encrypted_failure_queue(rounds):
    construct, template, _ = rounds
    queue_arn = arn_of(logical_id(construct.failure_queue))
    for function in (construct.initiator, construct.averager):
        template.has_resource_properties(
            "AWS::Lambda::EventInvokeConfig",
            {
                "FunctionName": {"Ref": logical_id(function)},
                "DestinationConfig": {"OnFailure": {"Destination": queue_arn}},
                "MaximumRetryAttempts": 2,
                "MaximumEventAgeInSeconds": 3600,
            },
        )
    template.has_resource_properties(
        "AWS::SQS::Queue", {"SqsManagedSseEnabled": True, "MessageRetentionPeriod": 1_209_600}
    )
    template.has_resource_properties(
        "AWS::SQS::QueuePolicy",
        {
            "PolicyDocument": {
                "Statement": assertions.Match.array_with(
                    [
                        assertions.Match.object_like(
                            {
                                "Effect": "Deny",
                                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                            }
                        )
                    ]
                )
            }
        },
    )


def test_one_schedule_ticks_both_functions(rounds):
    construct, template, _ = rounds
    template.resource_count_is("AWS::Events::Rule", 1)
    rule = next(iter(template.find_resources("AWS::Events::Rule").values()))["Properties"]
    assert rule["ScheduleExpression"] == "rate(7 minutes)"
    assert rule["State"] == "ENABLED"
    queue_arn = arn_of(logical_id(construct.failure_queue))
    targets = {t["Arn"]["Fn::GetAtt"][0]: t for t in rule["Targets"]}
    assert set(targets) == {logical_id(construct.initiator), logical_id(construct.averager)}
    for target in targets.values():
        assert json.loads(target["Input"]) == TICK_EVENT
        assert target["DeadLetterConfig"] == {"Arn": queue_arn}
        assert target["RetryPolicy"] == {
            "MaximumEventAgeInSeconds": 3600,
            "MaximumRetryAttempts": 2,
        }


def test_schedule_can_be_deployed_disabled(bare_stack):
    build(bare_stack, schedule_enabled=False)
    template = assertions.Template.from_stack(bare_stack)
    template.has_resource_properties("AWS::Events::Rule", {"State": "DISABLED"})


def test_deploy_asks_the_averager_once_for_model_version_zero(rounds):
    construct, template, template_json = rounds
    resources = template.find_resources("Custom::AWS")
    assert len(resources) == 1
    props = next(iter(resources.values()))["Properties"]
    # The request is JSON joined around the averager's name: put a placeholder there.
    joined = props["Create"]["Fn::Join"][1]
    text = "".join(p if isinstance(p, str) else "<" + p["Ref"] + ">" for p in joined)
    request = json.loads(text)
    assert request["service"] == "Lambda"
    assert request["action"] == "invoke"
    assert request["parameters"]["FunctionName"] == f"<{logical_id(construct.averager)}>"
    assert request["parameters"]["InvocationType"] == "Event"
    assert json.loads(request["parameters"]["Payload"]) == BOOTSTRAP_EVENT
    assert props["InstallLatestAwsSdk"] is False
    # Its caller may invoke the averager and nothing else.
    policy = template_json["Resources"][
        logical_id(construct.initial_model.node.find_child("CustomResourcePolicy"))
    ]
    assert policy["Properties"]["PolicyDocument"]["Statement"] == [
        {
            "Action": "lambda:InvokeFunction",
            "Effect": "Allow",
            "Resource": arn_of(logical_id(construct.averager)),
        }
    ]


# --- the initiator's zip ---------------------------------------------------------------------


def initiator_asset(synthesized: Synthesized) -> Path:
    code = resource_json(synthesized.template_json, synthesized.stack.rounds.initiator)
    key = code["Properties"]["Code"]["S3Key"]
    return synthesized.assembly_dir / f"asset.{key.removesuffix('.zip')}"


def test_initiator_zip_holds_the_handler_core_modules_and_pins_only(synthesized):
    asset = initiator_asset(synthesized)
    top = {p.name for p in asset.iterdir()}
    assert top == {
        "handler.py",
        "sfl",
        "aws_lambda_powertools",
        "aws_lambda_powertools-3.37.0.dist-info",
        "aws_xray_sdk",
        "aws_xray_sdk-2.15.0.dist-info",
        "wrapt",
        "wrapt-2.5.2.dist-info",
        "wrapt-stubs",  # wrapt's type stubs, part of its distribution
        "typing_extensions.py",
        "typing_extensions-4.16.0.dist-info",
    }
    modules = {p.relative_to(asset).as_posix() for p in (asset / "sfl").rglob("*.py")}
    assert {
        "sfl/__init__.py",
        "sfl/core/config.py",
        "sfl/core/layout.py",
        "sfl/core/resources.py",
    } <= modules
    # The heavy half of the core stays out.
    assert not modules & {
        "sfl/learning/codec.py",
        "sfl/server/averager.py",
        "sfl/learning/rules/aggregation.py",
    }
    assert not any(m.startswith(("sfl/learning/tasks/", "sfl/local/")) for m in modules)
    assert not list(asset.rglob("*.pyc"))
    # Compiled for this machine, not for Lambda: wrapt ships as its pure-Python implementation.
    assert not list(asset.rglob("*.so"))


def test_initiator_zip_imports_its_handler_with_torch_unavailable(synthesized):
    asset = initiator_asset(synthesized)
    probe = textwrap.dedent(
        """
        import sys
        for heavy in ("torch", "numpy", "safetensors"):
            sys.modules[heavy] = None  # any import of these now fails
        import handler, sfl
        assert sfl.__file__.startswith(sys.argv[1]), sfl.__file__
        assert callable(handler.lambda_handler)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(asset)],
        cwd=asset,
        env={
            "PYTHONPATH": str(asset),
            "PATH": "/usr/bin:/bin",
            "AWS_DEFAULT_REGION": "us-east-1",
            "PYTHONDONTWRITEBYTECODE": "1",
        },
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _contract(contract_id: str) -> dict:  # type: ignore[type-arg]
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return next(
        c for c in pyproject["tool"]["importlinter"]["contracts"] if c.get("id") == contract_id
    )


def test_every_core_module_in_the_initiator_zip_is_under_the_torch_free_contract():
    """The zip carries no torch because each sfl module the bundler picks is a source (or a
    parent package of one) of the contract forbidding torch, which lint-imports checks."""
    contract = _contract("torch-free")
    assert {"torch", "numpy", "safetensors", "sfl.learning"} <= set(contract["forbidden_modules"])
    sources = contract["source_modules"]
    handler = REPO_ROOT / "lambdas" / "initiator" / "handler.py"
    ours = [
        m
        for m in core_modules(handler, source_root=REPO_ROOT, package="sfl")
        if m.startswith("sfl")
    ]

    def covered(module: str) -> bool:
        return any(
            module == s or module.startswith(f"{s}.") or s.startswith(f"{module}.") for s in sources
        )

    assert "sfl.server.initiator" in ours
    assert [m for m in ours if not covered(m)] == []


def test_bundling_refuses_a_missing_core_module(tmp_path):
    package = tmp_path / "corepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    handler = tmp_path / "lambda_dir" / "handler.py"
    handler.parent.mkdir()
    handler.write_text("import corepkg.gone\n")
    with pytest.raises(
        BundlingError, match=r"do not exist: corepkg\.gone \(imported by __main__\)"
    ):
        core_modules(handler, source_root=tmp_path, package="corepkg")


def test_bundling_copies_only_what_the_handler_imports(tmp_path):
    package = tmp_path / "corepkg"
    (package / "sub").mkdir(parents=True)
    for name in ("__init__.py", "used.py", "unused.py", "sub/__init__.py", "sub/deep.py"):
        (package / name).write_text("")
    (package / "used.py").write_text("from corepkg.sub import deep\n")
    handler = tmp_path / "lambda_dir" / "handler.py"
    handler.parent.mkdir()
    handler.write_text("from corepkg import used\n")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# nothing vendored\n")
    out = _bundle_corepkg(tmp_path, handler, requirements)
    copied = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.py"))
    assert copied == [
        "corepkg/__init__.py",
        "corepkg/sub/__init__.py",
        "corepkg/sub/deep.py",
        "corepkg/used.py",
        "handler.py",
    ]


def _bundle_corepkg(tmp_path: Path, handler: Path, requirements: Path) -> Path:
    """Bundle a handler with the core package ``corepkg`` under tmp_path; the output dir."""
    out = tmp_path / "out"
    out.mkdir()
    bundle(
        handler=handler,
        requirements=requirements,
        source_root=tmp_path,
        package="corepkg",
        output_dir=out,
    )
    return out


def test_bundling_rejects_a_version_other_than_the_pin(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("aws-lambda-powertools==0.0.1\n")
    handler = tmp_path / "handler.py"
    handler.write_text("")
    with pytest.raises(BundlingError, match=r"pins 0\.0\.1"):
        _bundle_corepkg(tmp_path, handler, requirements)


def test_requirements_must_be_exact_pins(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nboto3>=1.30\n")
    with pytest.raises(BundlingError, match="not pinned"):
        read_pins(requirements)
    assert [p.name for p in read_pins(REPO_ROOT / "lambdas/initiator/requirements.txt")] == [
        "aws-lambda-powertools",
        "aws-xray-sdk",
        "wrapt",
        "typing-extensions",
    ]


def _installed_probe(site: Path, *, installer: str, requested: bool) -> None:
    """A pure-Python distribution ``hash-probe`` 1.0 as an installer left it in ``site``."""
    (site / "hash_probe").mkdir(parents=True)
    (site / "hash_probe" / "__init__.py").write_text("VALUE = 1\n")
    info = site / "hash_probe-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hash-probe\nVersion: 1.0\n")
    (info / "WHEEL").write_text("Wheel-Version: 1.0\nRoot-Is-Purelib: true\n")
    (info / "INSTALLER").write_text(f"{installer}\n")
    files = ["hash_probe/__init__.py", *(f"{info.name}/{n}" for n in ("METADATA", "WHEEL"))]
    files.append(f"{info.name}/INSTALLER")
    if requested:
        (info / "REQUESTED").write_text("")
        files.append(f"{info.name}/REQUESTED")
    (info / "direct_url.json").write_text(json.dumps({"url": site.as_uri()}))
    files += [f"{info.name}/direct_url.json", f"{info.name}/RECORD"]
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))


def test_the_initiator_zip_is_the_same_whichever_installer_put_its_pins_there(
    tmp_path, monkeypatch
):
    """Two machines with the same pinned version, installed by pip (asked for) and by uv (as
    a dependency): the zip's files, and so CDK's asset hash, are the same."""
    handler = tmp_path / "handler.py"
    handler.write_text("")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("hash-probe==1.0\n")
    outputs = []
    for machine, installer, requested in (("a", "pip", True), ("b", "uv", False)):
        site = tmp_path / machine / "site-packages"
        _installed_probe(site, installer=installer, requested=requested)
        with monkeypatch.context() as m:
            m.syspath_prepend(str(site))
            out = tmp_path / machine / "out"
            out.mkdir()
            bundle(
                handler=handler,
                requirements=requirements,
                source_root=tmp_path,
                package="corepkg",
                output_dir=out,
            )
        outputs.append(
            {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        )
    assert outputs[0] == outputs[1]
    assert "hash_probe/__init__.py" in outputs[0]
    assert "hash_probe-1.0.dist-info/METADATA" in outputs[0]  # the licence and name stay
