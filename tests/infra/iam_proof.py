"""What a principal's AWS calls need from IAM, and whether its policies grant exactly that.

``CallRecorder`` hooks botocore's event system on every client created while it is active
(``provide-client-params`` keeps each call's parameters, ``after-call`` its outcome) and
files each call under the principal in whose name the code is running. ``requests_for``
turns a call into the IAM requests AWS authorises for it (the action, the resource ARN and
the condition keys of the request context); ``Policies`` evaluates Allow statements the way
IAM does for the operators these policies use, and reports grants no request needed.
"""

from __future__ import annotations

import fnmatch
import json
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import botocore.session


@dataclass(frozen=True)
class Call:
    principal: str
    service: str
    operation: str
    params: Mapping[str, Any]
    status: int  # HTTP status of the response
    error: str  # error code, '' on success


class CallRecorder:
    """Records every AWS call made through botocore while active, per principal."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._principal: str | None = None
        self._lock = threading.Lock()

    @contextmanager
    def active(self) -> Iterator[CallRecorder]:
        original = botocore.session.Session.create_client
        recorder = self

        def create_client(session: Any, *args: Any, **kwargs: Any) -> Any:
            client = original(session, *args, **kwargs)
            client.meta.events.register("provide-client-params.*.*", recorder._keep_params)
            client.meta.events.register("after-call.*.*", recorder._record)
            return client

        botocore.session.Session.create_client = create_client  # type: ignore[method-assign]
        try:
            yield self
        finally:
            botocore.session.Session.create_client = original  # type: ignore[method-assign]

    @contextmanager
    def acting_as(self, principal: str) -> Iterator[None]:
        """Attribute the calls made meanwhile (from any thread) to ``principal``."""
        self._principal = principal
        try:
            yield
        finally:
            self._principal = None

    def _keep_params(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["sfl_params"] = json.loads(json.dumps(params, default=_placeholder))

    def _record(self, http_response: Any, parsed: Any, model: Any, context: Any, **_: Any) -> None:
        if self._principal is None:
            return
        error = parsed.get("Error", {}).get("Code", "") if isinstance(parsed, dict) else ""
        call = Call(
            principal=self._principal,
            service=model.service_model.service_name,
            operation=model.name,
            params=context.get("sfl_params", {}),
            status=int(http_response.status_code),
            error=str(error),
        )
        with self._lock:
            self.calls.append(call)

    def of(self, principal: str) -> list[Call]:
        return [c for c in self.calls if c.principal == principal]


def _placeholder(value: Any) -> str:
    return f"<{type(value).__name__}>"  # bodies and streams: their content does not matter


# --- from a call to IAM requests -------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One authorisation IAM makes: an action on a resource with a request context."""

    action: str
    resource: str
    context: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    call: str = ""  # the call it came from, for messages

    def describe(self) -> str:
        keys = ", ".join(f"{k}={list(v)}" for k, v in sorted(self.context.items()))
        return f"{self.action} on {self.resource}" + (f" [{keys}]" if keys else "")


@dataclass(frozen=True)
class Account:
    partition: str
    region: str
    account_id: str
    # table name -> its partition key attribute (dynamodb:LeadingKeys)
    partition_keys: Mapping[str, str]
    # bucket name -> ARN of the KMS key it encrypts objects with by default (SSE-KMS)
    bucket_keys: Mapping[str, str] = field(default_factory=dict)


# DynamoDB expression words that are not attribute names.
_EXPRESSION_WORDS = frozenset(
    {
        "SET", "REMOVE", "ADD", "DELETE", "AND", "OR", "NOT", "BETWEEN", "IN",
        "if_not_exists", "list_append", "attribute_exists", "attribute_not_exists",
        "attribute_type", "begins_with", "contains", "size",
    }
)  # fmt: skip
_NAME_TOKEN = re.compile(r"(?<![:\w#.])(#?[A-Za-z_][\w]*)")
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


def requests_for(call: Call, account: Account) -> list[Request]:
    """The IAM requests AWS makes to authorise ``call`` (Service Authorization Reference)."""
    mapper = _MAPPERS.get((call.service, call.operation))
    if mapper is None:
        raise LookupError(
            f"no IAM mapping for {call.service}:{call.operation}; add it to iam_proof._MAPPERS"
        )
    label = f"{call.service}:{call.operation}"
    return [Request(r.action, r.resource, r.context, call=label) for r in mapper(call, account)]


# PutObject parameters whose request headers IAM exposes as condition keys.
_PUT_CONDITION_KEYS = {
    "IfNoneMatch": "s3:if-none-match",
    "StorageClass": "s3:x-amz-storage-class",
    "SSECustomerAlgorithm": "s3:x-amz-server-side-encryption-customer-algorithm",
    "ServerSideEncryption": "s3:x-amz-server-side-encryption",
    "SSEKMSKeyId": "s3:x-amz-server-side-encryption-aws-kms-key-id",
}


def _sse_kms(call: Call, account: Account) -> list[Request]:
    """What S3 asks KMS, as the caller, for an object in a bucket encrypted with a KMS key
    by default: a data key to store one (single-part PutObject: kms:GenerateDataKey), the
    object's data key decrypted to return one (GetObject: kms:Decrypt; HeadObject reads
    only metadata). S3 user guide, "Using server-side encryption with AWS KMS keys"; AWS
    re:Post, "s3-large-file-encryption-kms-key" (multipart uploads also need kms:Decrypt)."""
    key = account.bucket_keys.get(str(call.params.get("Bucket", "")))
    if key is None or call.status >= 300:
        return []
    context = {"kms:ViaService": (f"s3.{account.region}.amazonaws.com",)}
    if call.operation == "PutObject":
        return [Request("kms:GenerateDataKey", key, context)]
    if call.operation == "GetObject":
        return [Request("kms:Decrypt", key, context)]
    return []


def _s3_object(call: Call, action: str, account: Account | None = None) -> list[Request]:
    bucket, key = call.params["Bucket"], call.params["Key"]
    if action == "s3:GetObject" and "VersionId" in call.params:
        action = "s3:GetObjectVersion"  # reading a given version is its own action
    context: dict[str, tuple[str, ...]] = {}
    if action == "s3:PutObject":
        for param, condition_key in _PUT_CONDITION_KEYS.items():
            if param in call.params:
                context[condition_key] = (str(call.params[param]),)
    requests = [Request(action, f"arn:aws:s3:::{bucket}/{key}", context)]
    if action == "s3:DeleteObject" and "IfMatch" in call.params:
        requests[0] = Request(
            action, requests[0].resource, {"s3:if-match": (call.params["IfMatch"],)}
        )
        if call.params["IfMatch"] != "*":
            # A conditional delete on an ETag needs s3:GetObject too (S3 user guide,
            # "Enforce conditional deletes").
            requests.append(Request("s3:GetObject", requests[0].resource))
    if call.error in _NOT_FOUND or call.status == 404:
        # S3 answers 404 for a missing key only to a caller allowed to list the bucket;
        # anyone else gets 403, which the code would not take for "not there yet".
        requests.append(Request("s3:ListBucket", f"arn:aws:s3:::{bucket}"))
    if account is not None:
        requests.extend(_sse_kms(call, account))
    return requests


def _s3_delete_objects(call: Call, _account: Account) -> list[Request]:
    """DeleteObjects is authorised object by object as s3:DeleteObject; an object's ETag is
    its If-Match (S3 user guide, "Enforce conditional deletes": DeleteObject and
    DeleteObjects alike), which needs s3:GetObject too."""
    bucket = call.params["Bucket"]
    requests = []
    for item in call.params["Delete"]["Objects"]:
        resource = f"arn:aws:s3:::{bucket}/{item['Key']}"
        etag = item.get("ETag")
        context = {"s3:if-match": (str(etag),)} if etag is not None else {}
        requests.append(Request("s3:DeleteObject", resource, context))
        if etag is not None and etag != "*":
            requests.append(Request("s3:GetObject", resource))
    return requests


def _s3_list(call: Call, _account: Account) -> list[Request]:
    context = {"s3:prefix": (str(call.params.get("Prefix", "")),)}
    return [Request("s3:ListBucket", f"arn:aws:s3:::{call.params['Bucket']}", context)]


def _s3_bucket_location(call: Call, _account: Account) -> list[Request]:
    return [Request("s3:GetBucketLocation", f"arn:aws:s3:::{call.params['Bucket']}")]


def _table_arn(table: str, account: Account) -> str:
    return f"arn:{account.partition}:dynamodb:{account.region}:{account.account_id}:table/{table}"


def _names_in(expression: str, names: Mapping[str, str]) -> set[str]:
    """Top-level attribute names an expression touches (``a.b[0]`` touches ``a``)."""
    found = set()
    for token in _NAME_TOKEN.findall(expression):
        if token in _EXPRESSION_WORDS or token.upper() in _EXPRESSION_WORDS:
            continue
        found.add(names.get(token, token) if token.startswith("#") else token)
    return found


def _item_request(action: str, table: str, params: Mapping[str, Any], account: Account) -> Request:
    """GetItem/PutItem/UpdateItem/DeleteItem/ConditionCheckItem, or one transaction item."""
    names = params.get("ExpressionAttributeNames", {})
    key = params.get("Key") or params.get("Item") or {}
    context: dict[str, tuple[str, ...]] = {}
    partition_key = account.partition_keys.get(table)
    if partition_key and partition_key in key:
        context["dynamodb:LeadingKeys"] = tuple(str(v) for v in key[partition_key].values())
    attributes = set(params.get("Key", {})) | set(params.get("Item", {}))
    for expression in ("UpdateExpression", "ConditionExpression", "ProjectionExpression"):
        if expression in params:
            attributes |= _names_in(str(params[expression]), names)
    if action == "dynamodb:GetItem" and "ProjectionExpression" not in params:
        # A GetItem without a projection asks for the whole item.
        context["dynamodb:Select"] = ("ALL_ATTRIBUTES",)
    context["dynamodb:Attributes"] = tuple(sorted(attributes))
    if "ReturnValues" in params:
        context["dynamodb:ReturnValues"] = (str(params["ReturnValues"]),)
    return Request(action, _table_arn(table, account), context)


def _dynamodb_item(action: str) -> Any:
    def mapper(call: Call, account: Account) -> list[Request]:
        return [_item_request(action, call.params["TableName"], call.params, account)]

    return mapper


def _dynamodb_table(action: str) -> Any:
    def mapper(call: Call, account: Account) -> list[Request]:
        context: dict[str, tuple[str, ...]] = {}
        if "Select" in call.params:
            context["dynamodb:Select"] = (str(call.params["Select"]),)
        resource = _table_arn(call.params["TableName"], account)
        if "IndexName" in call.params:
            resource += f"/index/{call.params['IndexName']}"  # an index is its own resource
        return [Request(action, resource, context)]

    return mapper


_TRANSACTION_ACTIONS = {
    "Put": "dynamodb:PutItem",
    "Update": "dynamodb:UpdateItem",
    "Delete": "dynamodb:DeleteItem",
    "ConditionCheck": "dynamodb:ConditionCheckItem",
    "Get": "dynamodb:GetItem",
}


def _dynamodb_transaction(call: Call, account: Account) -> list[Request]:
    """A transaction is authorised item by item, each by its own action."""
    requests = []
    for item in call.params["TransactItems"]:
        ((kind, params),) = item.items()
        requests.append(
            _item_request(_TRANSACTION_ACTIONS[kind], params["TableName"], params, account)
        )
    return requests


def _dynamodb_batch_write(call: Call, account: Account) -> list[Request]:
    """BatchWriteItem is authorised per table, by its own action, with every item's
    partition key among the request's leading keys."""
    requests = []
    for table, writes in call.params["RequestItems"].items():
        partition_key = account.partition_keys.get(table)
        leading = []
        for write in writes:
            ((_, request),) = write.items()
            key = request.get("Item") or request.get("Key") or {}
            if partition_key and partition_key in key:
                leading.extend(str(v) for v in key[partition_key].values())
        context = {"dynamodb:LeadingKeys": tuple(sorted(set(leading)))} if leading else {}
        requests.append(Request("dynamodb:BatchWriteItem", _table_arn(table, account), context))
    return requests


def _lambda_invoke(call: Call, account: Account) -> list[Request]:
    name = str(call.params["FunctionName"])
    if not name.startswith("arn:"):
        name = (
            f"arn:{account.partition}:lambda:{account.region}:{account.account_id}:function:{name}"
        )
    return [Request("lambda:InvokeFunction", name)]


def _log_stream(action: str) -> Any:
    def mapper(call: Call, account: Account) -> list[Request]:
        group, stream = call.params["logGroupName"], call.params["logStreamName"]
        arn = f"arn:{account.partition}:logs:{account.region}:{account.account_id}"
        return [Request(action, f"{arn}:log-group:{group}:log-stream:{stream}")]

    return mapper


def _sqs_send(call: Call, account: Account) -> list[Request]:
    queue = unquote(str(call.params["QueueUrl"])).rstrip("/").rsplit("/", 1)[-1]
    arn = f"arn:{account.partition}:sqs:{account.region}:{account.account_id}:{queue}"
    return [Request("sqs:SendMessage", arn)]


def _xray(action: str) -> Any:
    def mapper(_call: Call, _account: Account) -> list[Request]:
        # X-Ray's trace and telemetry writes have no resource-level permissions: IAM
        # authorises them on "*" (Service Authorization Reference, AWS X-Ray).
        return [Request(action, "*")]

    return mapper


def _stack_read(call: Call, _account: Account) -> list[Request]:
    name = str(call.params["StackName"])
    if not name.startswith("arn:"):
        # IAM authorises it on the stack's ARN, which holds the stack's id: a name alone
        # does not say which resource that is.
        raise LookupError(f"cloudformation:DescribeStacks by name ({name}): name its ARN")
    return [Request("cloudformation:DescribeStacks", name)]


def _iot_policy_targets(call: Call, account: Account) -> list[Request]:
    arn = f"arn:{account.partition}:iot:{account.region}:{account.account_id}"
    return [Request("iot:ListTargetsForPolicy", f"{arn}:policy/{call.params['policyName']}")]


def _iot_detach_policy(call: Call, _account: Account) -> list[Request]:
    # Authorised on the target that holds the policy (a certificate's or a thing group's
    # ARN), not on the policy (Service Authorization Reference, AWS IoT: DetachPolicy).
    return [Request("iot:DetachPolicy", str(call.params["target"]))]


def _iot_describe_endpoint(_call: Call, _account: Account) -> list[Request]:
    # DescribeEndpoint has no resource-level permissions: IAM authorises it on "*"
    # (Service Authorization Reference, AWS IoT).
    return [Request("iot:DescribeEndpoint", "*")]


def _iot_data_publish(call: Call, account: Account) -> list[Request]:
    # The data plane's Publish is authorised on the topic's ARN (AWS IoT Core policy actions).
    arn = f"arn:{account.partition}:iot:{account.region}:{account.account_id}"
    return [Request("iot:Publish", f"{arn}:topic/{call.params['topic']}")]


def _role_arn(role_name: str, account: Account) -> str:
    return f"arn:{account.partition}:iam::{account.account_id}:role/{role_name}"  # path "/"


def _iam_role_policies(call: Call, account: Account) -> list[Request]:
    return [Request("iam:ListAttachedRolePolicies", _role_arn(call.params["RoleName"], account))]


def _iam_detach_role_policy(call: Call, account: Account) -> list[Request]:
    context = {"iam:PolicyARN": (str(call.params["PolicyArn"]),)}
    return [Request("iam:DetachRolePolicy", _role_arn(call.params["RoleName"], account), context)]


_MAPPERS: dict[tuple[str, str], Any] = {
    ("s3", "GetObject"): lambda c, a: _s3_object(c, "s3:GetObject", a),
    ("s3", "HeadObject"): lambda c, a: _s3_object(c, "s3:GetObject", a),
    ("s3", "PutObject"): lambda c, a: _s3_object(c, "s3:PutObject", a),
    ("s3", "DeleteObject"): lambda c, a: _s3_object(c, "s3:DeleteObject", a),
    ("s3", "DeleteObjects"): _s3_delete_objects,
    ("s3", "ListObjectsV2"): _s3_list,
    ("s3", "GetBucketLocation"): _s3_bucket_location,
    ("dynamodb", "GetItem"): _dynamodb_item("dynamodb:GetItem"),
    ("dynamodb", "PutItem"): _dynamodb_item("dynamodb:PutItem"),
    ("dynamodb", "UpdateItem"): _dynamodb_item("dynamodb:UpdateItem"),
    ("dynamodb", "DeleteItem"): _dynamodb_item("dynamodb:DeleteItem"),
    ("dynamodb", "Query"): _dynamodb_table("dynamodb:Query"),
    ("dynamodb", "Scan"): _dynamodb_table("dynamodb:Scan"),
    ("dynamodb", "TransactWriteItems"): _dynamodb_transaction,
    ("dynamodb", "TransactGetItems"): _dynamodb_transaction,
    ("dynamodb", "BatchWriteItem"): _dynamodb_batch_write,
    ("lambda", "Invoke"): _lambda_invoke,
    ("logs", "CreateLogStream"): _log_stream("logs:CreateLogStream"),
    ("logs", "PutLogEvents"): _log_stream("logs:PutLogEvents"),
    ("sqs", "SendMessage"): _sqs_send,
    ("xray", "PutTraceSegments"): _xray("xray:PutTraceSegments"),
    ("xray", "PutTelemetryRecords"): _xray("xray:PutTelemetryRecords"),
    ("cloudformation", "DescribeStacks"): _stack_read,
    ("iot", "ListTargetsForPolicy"): _iot_policy_targets,
    ("iot", "DetachPolicy"): _iot_detach_policy,
    ("iot", "DescribeEndpoint"): _iot_describe_endpoint,
    ("iot-data", "Publish"): _iot_data_publish,
    ("iam", "ListAttachedRolePolicies"): _iam_role_policies,
    ("iam", "DetachRolePolicy"): _iam_detach_role_policy,
}


# --- evaluating Allow statements -------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """One (action, resource) of one statement, with the statement's conditions."""

    action: str
    resource: str
    conditions: Mapping[str, Mapping[str, Any]]
    policy: str

    def describe(self) -> str:
        return f"{self.action} on {self.resource} ({self.policy})" + (
            f" if {json.dumps(self.conditions, sort_keys=True)}" if self.conditions else ""
        )


class Policies:
    """The identity policies of one role, as IAM holds them."""

    def __init__(self, documents: Mapping[str, Mapping[str, Any]]) -> None:
        self.grants: list[Grant] = []
        for name, document in documents.items():
            statements = document["Statement"]
            for statement in statements if isinstance(statements, list) else [statements]:
                unknown = set(statement) - {"Sid", "Effect", "Action", "Resource", "Condition"}
                assert statement["Effect"] == "Allow" and not unknown, (name, statement)
                for action in _as_list(statement["Action"]):
                    for resource in _as_list(statement["Resource"]):
                        self.grants.append(
                            Grant(action, resource, statement.get("Condition", {}), name)
                        )

    def allows(self, request: Request, variables: Mapping[str, str]) -> bool:
        return any(_matches(g, request, variables) for g in self.grants)

    def unused(self, requests: Sequence[tuple[Request, Mapping[str, str]]]) -> list[Grant]:
        return [g for g in self.grants if not any(_matches(g, r, v) for r, v in requests)]


class KeyPolicy:
    """A KMS key's policy. Its statements name principals; "*" as the resource is the key.
    KMS allows a same-account caller what a statement naming the caller allows, or what a
    statement naming the account's root allows *and* the caller's IAM policies allow; nothing
    else (KMS developer guide, "Key policies"; AWS re:Post, "s3-large-file-encryption-kms-key":
    a same-account role needs the permission in the key policy)."""

    def __init__(self, document: Mapping[str, Any], name: str = "key policy") -> None:
        self.grants: list[tuple[tuple[str, ...], Grant]] = []
        statements = document["Statement"]
        for statement in statements if isinstance(statements, list) else [statements]:
            unknown = set(statement) - {
                "Sid", "Effect", "Principal", "Action", "Resource", "Condition",
            }  # fmt: skip
            assert statement["Effect"] == "Allow" and not unknown, (name, statement)
            principals = tuple(str(p) for p in _as_list(statement["Principal"]["AWS"]))
            for action in _as_list(statement["Action"]):
                for resource in _as_list(statement["Resource"]):
                    grant = Grant(action, resource, statement.get("Condition", {}), name)
                    self.grants.append((principals, grant))

    def allows(
        self,
        request: Request,
        principal: str,
        *,
        identity: Policies | None = None,
        variables: Mapping[str, str] | None = None,
    ) -> bool:
        """Whether KMS lets ``principal`` (an ARN) make ``request`` on this key."""
        variables = variables or {}
        root = principal.split(":")[:5]  # arn:partition:iam::account
        account_root = ":".join(root) + ":root"
        for principals, grant in self.grants:
            if not _matches(grant, request, variables):
                continue
            if principal in principals:
                return True
            if (
                account_root in principals
                and identity is not None
                and identity.allows(request, variables)
            ):
                return True
        return False

    def principals(self, action: str) -> set[str]:
        """Every principal a statement allows ``action`` (a statement may need more)."""
        return {p for ps, g in self.grants if _like(g.action, action) for p in ps}

    def unused(self, principal: str, requests: Sequence[Request]) -> list[Grant]:
        """The grants naming ``principal`` that none of its requests needed."""
        return [
            g
            for ps, g in self.grants
            if principal in ps and not any(_matches(g, r, {}) for r in requests)
        ]


def role_policies(iam: Any, role_name: str) -> Policies:
    """Inline and attached managed policies of a role, read back from IAM."""
    documents: dict[str, Mapping[str, Any]] = {}
    for name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
        document = iam.get_role_policy(RoleName=role_name, PolicyName=name)["PolicyDocument"]
        documents[f"inline {name}"] = _document(document)
    for attached in iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]:
        policy = iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]
        version = iam.get_policy_version(
            PolicyArn=attached["PolicyArn"], VersionId=policy["DefaultVersionId"]
        )["PolicyVersion"]
        documents[f"managed {attached['PolicyName']}"] = _document(version["Document"])
    return Policies(documents)


def _document(value: Any) -> Mapping[str, Any]:
    if isinstance(value, str):
        value = json.loads(unquote(value))
    return dict(value)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _substitute(value: str, variables: Mapping[str, str]) -> str:
    for name, replacement in variables.items():
        value = value.replace("${" + name + "}", replacement)
    if "${" in value:
        raise AssertionError(f"policy variable without a value in {value!r}")
    return value


def _like(pattern: str, value: str) -> bool:
    """IAM wildcards: '*' any run of characters (slashes too), '?' one character."""
    return fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))


def _matches(grant: Grant, request: Request, variables: Mapping[str, str]) -> bool:
    if not _like(grant.action, request.action):
        return False
    if not _like(_substitute(grant.resource, variables), request.resource):
        return False
    return all(
        _condition(operator, key, values, request.context, variables)
        for operator, block in grant.conditions.items()
        for key, values in block.items()
    )


_BASE_OPERATORS = {
    "StringEquals": lambda policy, value: policy == value,
    "StringLike": _like,
    "ArnEquals": lambda policy, value: policy == value,
    "ArnLike": _like,
    "Bool": lambda policy, value: policy.lower() == value.lower(),
}
# Negated operators: a value matches when it equals (is like) none of the policy's values.
_NEGATED = {
    "StringNotEquals": "StringEquals",
    "StringNotLike": "StringLike",
    "ArnNotEquals": "ArnEquals",
    "ArnNotLike": "ArnLike",
}


def _condition(
    operator: str,
    key: str,
    policy_values: Any,
    context: Mapping[str, tuple[str, ...]],
    variables: Mapping[str, str],
) -> bool:
    """One condition key of one operator, per IAM's documented evaluation."""
    qualifier, _, name = operator.rpartition(":")
    if name == "Null" and not qualifier:
        # "true": the key must be absent; "false": present.
        absent = key not in context
        return all((str(v).lower() == "true") == absent for v in _as_list(policy_values))
    if_exists = name.endswith("IfExists")
    plain = name.removesuffix("IfExists")
    negated = plain in _NEGATED
    base = _BASE_OPERATORS.get(_NEGATED.get(plain, plain))
    if base is None or qualifier not in {"", "ForAllValues", "ForAnyValue"}:
        raise AssertionError(f"this evaluator does not know the condition operator {operator}")
    allowed = [_substitute(str(v), variables) for v in _as_list(policy_values)]
    values = context.get(key)
    if values is None:
        # A missing key: ForAllValues holds (vacuously), IfExists holds, a negated operator
        # holds (the request's value matches none of the policy's), the rest fail.
        return qualifier == "ForAllValues" or if_exists or (negated and not qualifier)
    matched = [any(base(p, v) for p in allowed) is not negated for v in values]
    if qualifier == "ForAllValues":
        return all(matched)
    if qualifier == "ForAnyValue":
        return any(matched)
    return len(values) == 1 and matched[0]
