"""Operating a federation: the ``sfl`` commands that talk to a deployed stack or local mode."""
