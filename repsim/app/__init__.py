"""The application layer: the repsim CLI and the demo; the only code that imports click, hooks and probes."""
