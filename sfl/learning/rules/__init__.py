"""Aggregation rules: pure maths over tensors, one rule family per file (FedAvg, server
optimisers, robust rules) plus the default bounds every rule sits on."""
