"""Image sources in a fixed, documented sample order: :mod:`~repsim.data.sources` (``--data SPEC``: folders,
CIFAR, the bundled data sets), :mod:`~repsim.data.image_source` (their base class), :mod:`~repsim.data.shapes`
(repsim's own procedural data set with exact masks), :mod:`~repsim.data.masks` (ground-truth masks on a token
grid) and :mod:`~repsim.data.perturbations` (``extract --perturb``)."""
