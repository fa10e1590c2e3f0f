"""Attention of vision transformers, from stored statistics: :mod:`~repsim.attention.statistics` (pure math on
attention probabilities: distances, aligned maps, head classes, rollout), :mod:`~repsim.attention.report`
(``repsim attention``) and :mod:`~repsim.attention.segmentation` (``repsim attention --segmentation``)."""
