"""cfn-lint: the synthesized template has no error and no warning, in the regions we target."""

from __future__ import annotations

from cfnlint.api import ManualArgs, lint_file
from stack_template import Synthesized

# Regions with everything the stack uses (Lambda container images, IoT, Greengrass V2).
REGIONS = ["us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-northeast-1"]


def test_template_lints_clean(synthesized: Synthesized):
    matches = lint_file(synthesized.template_path, ManualArgs(regions=REGIONS))
    assert [str(m) for m in matches] == []


def test_the_only_ignored_rule_is_the_redundant_role_dependency(synthesized: Synthesized):
    ignored = {
        (resource["Type"], rule)
        for resource in synthesized.template_json["Resources"].values()
        for rule in resource.get("Metadata", {})
        .get("cfn-lint", {})
        .get("config", {})
        .get("ignore_checks", [])
    }
    assert ignored == {("AWS::Lambda::Function", "W3005")}
