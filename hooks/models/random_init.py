"""Random initialisation without switched-off branches: the random baseline of a representation analysis.

``random_init=True`` (:func:`hooks.models.registry.load_model`) builds the framework's initialisation with
every residual branch and the classifier switched on (see :func:`switch_branches_on`; timm's ``zero_init_last``
alone makes every ResNet block the identity).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

#: Random initialisations :func:`~hooks.models.registry.load_model` can build (recorded as ``weights["init"]``).
#: ``"branches-on"`` (the default): the framework's own initialisation (timm, torchvision, transformers, or the
#: ``py:`` factory), then every residual branch and the classifier switched on (:func:`switch_branches_on`).
#: ``"framework"``: the framework's initialisation untouched (the start of a training run: with timm's
#: ``zero_init_last`` every ResNet block is the identity). Stores written before repsim recorded ``init``
#: were built this way, and :func:`~hooks.models.registry.reload_model` rebuilds them so.
INIT_SCHEMES = ("branches-on", "framework")

#: parameter names of layer-scale factors and skip-init gains: they multiply a residual branch
_GATE_NAMES = re.compile(r"gamma(_\d)?|layer_scale(_parameter)?|lambda_?\d|skipinit_gain")
#: modules whose gamma is not a branch gate (ConvNeXt-V2's GRN starts at gamma = 0 as the identity by design)
_NOT_GATES = re.compile(r"GlobalResponseNorm|GRN", re.IGNORECASE)
#: a gate this small (or a norm scale of exactly 0) leaves its branch off: 1e-6 (ConvNeXt), 1e-5 (DINOv2,
#: CaiT), 0 (NFNet skip-init). BEiT's 0.1 is a real, if damped, branch and stays.
_GATE_OFF = 1e-3


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) or (
        "norm" in type(module).__name__.lower() and not _NOT_GATES.search(type(module).__name__))


@torch.no_grad()
def switch_branches_on(module: nn.Module) -> dict[str, list[str]]:
    """Undo the initialisations that switch residual branches or the classifier off (in place).

    Frameworks initialise networks for *training*: timm zeroes the last norm scale of every ResNet / LeViT
    residual branch (``zero_init_last``), ConvNeXt and DINOv2 scale each branch by a layer-scale of 1e-6 /
    1e-5, NFNet multiplies it by a skip-init gain of 0, MLP-Mixer and torchvision's ViT zero the classifier.
    Untrained, such a network is degenerate: every block is (nearly) the identity, consecutive blocks have CKA
    1 and the logits are constant, which is useless as the random baseline of a representation analysis.
    This sets, with no other change:

    - a norm layer's scale (``weight``) that is exactly 0 to 1, PyTorch's default for norm layers;
    - a constant layer-scale / skip-init gain (``gamma``, ``gamma_1``, ``layer_scale``, ``lambda1``,
      ``skipinit_gain``, ...) with ``|value| <= 1e-3`` to 1, i.e. the architecture without layer scale;
    - an ``nn.Linear`` / ``nn.Conv*`` weight that is exactly 0 to PyTorch's default init of that layer
      (Kaiming-uniform with a = sqrt(5)); its bias is left as it is. This draws from the torch RNG, so
      call it under the seed of the build.

    Returns the changed parameter names per rule (empty lists dropped), for the provenance record.
    """
    changes: dict[str, list[str]] = {"norm_scale_0_to_1": [], "gate_to_1": [], "zero_weight_to_default_init": []}
    gated: set[int] = set()
    for mname, mod in module.named_modules():
        prefix = mname + "." if mname else ""
        if not _NOT_GATES.search(type(mod).__name__):
            for pname, p in mod.named_parameters(recurse=False):
                if (_GATE_NAMES.fullmatch(pname) and p.numel() and bool((p == p.reshape(-1)[0]).all())
                        and abs(float(p.reshape(-1)[0])) <= _GATE_OFF):
                    p.fill_(1.0)
                    gated.add(id(p))
                    changes["gate_to_1"].append(prefix + pname)
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter) or w.numel() == 0 or id(w) in gated or bool(w.any()):
            continue
        if _is_norm(mod):
            w.fill_(1.0)
            changes["norm_scale_0_to_1"].append(prefix + "weight")
        elif isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            changes["zero_weight_to_default_init"].append(prefix + "weight")
    return {k: v for k, v in changes.items() if v}


__all__ = ["INIT_SCHEMES", "switch_branches_on"]
