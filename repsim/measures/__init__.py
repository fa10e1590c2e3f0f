"""Similarity of representations: :mod:`~repsim.measures.gram` (U-centred Grams),
:mod:`~repsim.measures.cka_engine` (exact, debiased, minibatch and distributed CKA from stores),
:mod:`~repsim.measures.beyond_cka` (Procrustes, CCA family, RSA, ... on arrays),
:mod:`~repsim.measures.compare` (layer × layer maps of any measure between two stores) and
:mod:`~repsim.measures.intervals` (bootstrap, half-sample and permutation uncertainty).

(Not ``repsim.similarity``: that name is the public function :func:`repsim.similarity`.)"""
