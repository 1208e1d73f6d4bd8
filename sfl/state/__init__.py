"""The federation's state in DynamoDB and S3, one store per concern (rounds, registry, models,
control, lineage). Torch-free: the initiator's zip carries it."""
