"""The ``sfl`` command: one tree, a module per command group."""
