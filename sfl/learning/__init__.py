"""The learning side (torch): the update codec and compression, the aggregation rules and the
training tasks. Runs on devices, in the averager's image and in local mode."""
