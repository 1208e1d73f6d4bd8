"""The DynamoDB tables of the round protocol, built from the shared definitions."""

from __future__ import annotations

from aws_cdk import RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from constructs import Construct

from infra.compliance import skip_checkov
from sfl.core.resources import CLIENTS_TABLE, ROUNDS_TABLE, KeyAttribute, TableSpec

_ATTRIBUTE_TYPES = {"S": dynamodb.AttributeType.STRING, "N": dynamodb.AttributeType.NUMBER}


class FederationState(Construct):
    """The client registry and the round records: on-demand, point-in-time recovery on.

    Attributes: ``clients_table``, ``rounds_table``.
    """

    def __init__(self, scope: Construct, construct_id: str, *, retain_data: bool) -> None:
        super().__init__(scope, construct_id)
        self._removal_policy = RemovalPolicy.RETAIN if retain_data else RemovalPolicy.DESTROY
        self.clients_table = self._table(CLIENTS_TABLE)
        self.rounds_table = self._table(ROUNDS_TABLE)

    def _table(self, spec: TableSpec) -> dynamodb.Table:
        table = dynamodb.Table(
            self,
            spec.logical_id,
            partition_key=_attribute(spec.partition_key),
            sort_key=_attribute(spec.sort_key) if spec.sort_key else None,
            time_to_live_attribute=spec.ttl_attribute,
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            # The account's AWS-managed key: encrypted at rest, no key to pay for when idle.
            encryption=dynamodb.TableEncryption.AWS_MANAGED,
            removal_policy=self._removal_policy,
        )
        for index in spec.indexes:
            table.add_global_secondary_index(
                index_name=index.name,
                partition_key=_attribute(index.partition_key),
                sort_key=_attribute(index.sort_key) if index.sort_key else None,
                projection_type=dynamodb.ProjectionType.ALL
                if index.projected is None
                else dynamodb.ProjectionType.INCLUDE,
                non_key_attributes=list(index.projected) if index.projected else None,
            )
        skip_checkov(
            table,
            "CKV_AWS_119",
            "Encrypted at rest with the AWS-managed DynamoDB key (aws/dynamodb); a "
            "customer-managed key would cost a monthly fee while the stack is idle and grant "
            "nothing a reviewer could not already audit through IAM.",
        )
        return table


def _attribute(key: KeyAttribute) -> dynamodb.Attribute:
    return dynamodb.Attribute(name=key.name, type=_ATTRIBUTE_TYPES[key.type])
