"""The extraction loop (:mod:`~hooks.extract.loop`: images → model → hooks → store) and its Dask scale-out
(:mod:`~hooks.extract.distributed`)."""
