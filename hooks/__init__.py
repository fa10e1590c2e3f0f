"""Everything that runs a model: :mod:`hooks.models` (loading), :mod:`hooks.capture` (what a forward pass
records), :mod:`hooks.extract` (the extraction loop into a store) and :mod:`hooks.gradients` (ERF, attributions).
Imports :mod:`repsim` (store, data); never :mod:`probes`."""
