"""What ``sfl new`` copies into a new app: its task module and the test of it (valid Python,
linted and type-checked here like the rest; ``sfl.build.new_app`` writes the other files)."""
