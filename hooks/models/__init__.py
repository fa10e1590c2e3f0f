"""Models and their inputs: :mod:`~hooks.models.registry` (short names and ``timm:`` / ``hf:`` /
``torchvision:`` / ``py:`` specs), :mod:`~hooks.models.reference_models` (the bundled models),
:mod:`~hooks.models.weights` (local weights files with their sha256), :mod:`~hooks.models.preprocess` (the
evaluation transform as data) and :mod:`~hooks.models.geometry` (token geometry a user model declares)."""
