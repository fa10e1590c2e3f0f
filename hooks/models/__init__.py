"""Models and their inputs: :mod:`~hooks.models.registry` (short names and ``timm:`` / ``hf:`` /
``torchvision:`` / ``py:`` specs, ``load_model`` / ``reload_model``), one loader per source
(:mod:`~hooks.models.timm_loader`, :mod:`~hooks.models.hf_loader`, :mod:`~hooks.models.torchvision_loader`,
:mod:`~hooks.models.py_loader`, :mod:`~hooks.models.reference_loader`) returning the types of
:mod:`~hooks.models.loaded`, :mod:`~hooks.models.downloads` (weights caches, hub / URL downloads, sha256 records),
:mod:`~hooks.models.random_init` (random initialisation with every branch on),
:mod:`~hooks.models.reference_models` (the bundled models), :mod:`~hooks.models.weights` (local weights files with
their sha256), :mod:`~hooks.models.preprocess` (the evaluation transform as data) and
:mod:`~hooks.models.geometry` (token geometry a user model declares)."""
