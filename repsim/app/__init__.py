"""The application layer: the ``repsim`` command line (:mod:`repsim.app.cli` and its command modules) and the
demo (:mod:`repsim.app.demo`).

It is the only code that imports click, ``hooks`` and ``probes`` together with the library; nothing in the
library (``repsim`` outside this package, ``hooks``, ``probes``) imports it. Importing this package imports
nothing else: ``repsim info`` must not load torch.
"""
