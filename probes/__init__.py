"""Trained read-outs on stored activations: linear / k-NN transfer probes, spatial-localisation probes and
attribution probes (see the project's issues). Reads stores through :mod:`repsim`; never imports ``hooks``.
"""
