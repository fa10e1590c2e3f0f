"""Analyses that need gradients through the model: :mod:`~hooks.gradients.erf` (effective receptive fields)
and :mod:`~hooks.gradients.attribution` (captum attributions scored by the pointing game)."""
