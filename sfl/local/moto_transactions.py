"""Local mode only: moto's TransactWriteItems at a cost that does not grow with the table.

moto makes a transaction all-or-nothing by deep-copying every table it touches before it
starts and putting the copies back if it is cancelled: a transaction on a table of 10,000
slot items copies 10,000 items (~0.7 s at 2,000). Real DynamoDB's cost depends on the items
in the transaction only. This wraps moto's own method: the tables are not copied (a
thread-local flag makes ``Table.__deepcopy__`` return the table itself, for the wrapped call
only), and instead the at most 100 items the transaction names are saved before it runs and
written back, through moto's own put/delete, if it fails. Conditions, cancellation reasons
and what is written are moto's, unchanged; only the rollback is narrower, and it restores
exactly what moto's would (nothing outside those items can change in a transaction).
"""

from __future__ import annotations

import copy
import threading
from typing import Any

_state = threading.local()
_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Patch moto's DynamoDB backend in this process (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        from moto.dynamodb.models import DynamoDBBackend
        from moto.dynamodb.models.table import Table

        original_transact = DynamoDBBackend.transact_write_items
        original_deepcopy = getattr(Table, "__deepcopy__", None)

        def table_deepcopy(self: Any, memo: dict[int, Any]) -> Any:
            if getattr(_state, "in_transaction", False):
                return self  # the rollback is item by item (below)
            if original_deepcopy is not None:
                return original_deepcopy(self, memo)
            # The default deepcopy, without this method in the way.
            cls = self.__class__
            clone = cls.__new__(cls)
            memo[id(self)] = clone
            for name, value in self.__dict__.items():
                setattr(clone, name, copy.deepcopy(value, memo))
            return clone

        def transact_write_items(self: Any, transact_items: list[dict[str, Any]]) -> None:
            saved = _save(self, transact_items)
            _state.in_transaction = True
            try:
                original_transact(self, transact_items)
            except Exception:
                _restore(self, saved)
                raise
            finally:
                _state.in_transaction = False

        Table.__deepcopy__ = table_deepcopy  # type: ignore[attr-defined]
        DynamoDBBackend.transact_write_items = transact_write_items  # type: ignore[method-assign]
        _installed = True


def _save(backend: Any, transact_items: list[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    """(table, key, the item's attributes or None) of each item a transaction names."""
    saved = []
    for entry in transact_items[:100]:
        try:
            ((kind, op),) = entry.items()
            table_name = op["TableName"]
            table = backend.get_table(table_name)
            if kind == "Put":
                attrs = op["Item"]
                key = {table.hash_key_attr: attrs[table.hash_key_attr]}
                if table.range_key_attr is not None:
                    key[table.range_key_attr] = attrs[table.range_key_attr]
            else:
                key = op["Key"]
            item = backend.get_item(table_name, key)
        except Exception:  # noqa: S112 (a malformed request: moto itself refuses it)
            continue
        attrs = copy.deepcopy(item.to_json()["Attributes"]) if item is not None else None
        saved.append((table_name, key, attrs))
    return saved


def _restore(backend: Any, saved: list[tuple[str, Any, Any]]) -> None:
    for table_name, key, attrs in reversed(saved):
        if attrs is None:
            if backend.get_item(table_name, key) is not None:
                backend.delete_item(table_name, key)
        else:
            backend.put_item(table_name, attrs)
