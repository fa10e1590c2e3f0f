"""Figures drawn from results: :mod:`~repsim.plotting.cka_map` (the layer × layer CKA heat map) and
:mod:`~repsim.plotting.attention` (attention distance and head figures)."""
