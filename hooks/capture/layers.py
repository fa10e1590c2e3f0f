"""Which layers to record: per-family presets, user patterns, and the memory layout of each layer's output.

A *preset* lists module paths (``named_modules`` names) in network order: the stem / patch embedding, the
residual stream after every block, the pre-logits features and the logits:

- vit (timm ViT, DeiT, DINO, DINOv2, CLIP, MAE, BEiT): ``patch_embed``, ``blocks.i``, ``head_drop``,
  ``head`` (+ ``head_dist`` for distilled models)
- swin: ``patch_embed``, ``layers.i.blocks.j``, ``head.drop``, ``head.fc``
- resnet (timm and torchvision): ``maxpool``, ``layerX.Y``, ``global_pool`` (timm) / ``avgpool``
  (torchvision), ``fc``
- convnext: ``stem``, ``stages.i.blocks.j``, ``head.drop``, ``head.fc``
- mixer: ``stem``, ``blocks.i``, ``head_drop``, ``head``
- nfnet: ``stem``, ``stages.i.j``, ``head.drop``, ``head.fc``
- levit: ``stem``, ``stages.i.blocks.j``, ``head.drop``, ``head.linear`` (+ ``head_dist.linear``)
- efficientnet: ``bn1`` (stem conv + BN + act), ``blocks.i.j``, ``global_pool``, ``classifier``
- hf_vit (transformers ViT-like, discovered): ``…embeddings``, every layer of the encoder's layer list,
  the final ``…layernorm``, the classifier(s)
- generic: the children of the outermost block containers, then the last ``nn.Linear`` (see
  :func:`_generic`); no stem or pre-logits, since neither can be recognised by structure alone

*Pre-logits* is the module whose output is exactly the vector the classifier receives (in eval mode):
for timm ViTs ``head_drop`` follows the token / average pooling and ``fc_norm``, so it is the pooled vector
for every pooling mode. Two exceptions, by construction of the models: distilled ViTs (DeiT) call
``head_drop`` twice (``head_drop@0`` is the class token, ``@1`` the distillation token), and Hugging Face
ViTs pool by indexing (``sequence_output[:, 0]``), so their pre-logits tap is the final ``layernorm`` token
sequence (take the class token, e.g. ``--pool cls``). LeViT's classifier is a BatchNorm + Linear pair:
``head.drop`` is the normalised pooled vector that ``head.linear`` receives.

Patterns (:func:`select_layers`) are exact module paths or globs in which ``*`` matches within one path
component and ``**`` across components: ``blocks.*`` selects ``blocks.0`` … ``blocks.11`` but not
``blocks.0.attn``; ``blocks.**`` selects everything under ``blocks``.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Callable, Sequence

from torch import nn

from repsim.errors import UsageError

FAMILIES = ("vit", "swin", "resnet", "convnext", "mixer", "nfnet", "levit", "efficientnet", "hf_vit", "generic")


# -- helpers -----------------------------------------------------------------------------------------------
def _children(modules: dict[str, nn.Module], path: str) -> list[str]:
    """Paths of the direct children of ``path`` (registration order)."""
    mod = modules.get(path)
    if mod is None:
        return []
    return [f"{path}.{name}" if path else name for name, _ in mod.named_children()]


def _first(modules: dict[str, nn.Module], *candidates: str) -> str | None:
    return next((c for c in candidates if c in modules), None)


def _numbered(modules: dict[str, nn.Module], pattern: str) -> list[str]:
    """Module paths matching a regex, in registration order."""
    rx = re.compile(pattern)
    return [p for p in modules if rx.fullmatch(p)]


# -- presets: each returns the path list, or None when the module does not have the family's structure -----
def _vit(modules: dict[str, nn.Module]) -> list[str] | None:
    if "patch_embed" not in modules or "blocks" not in modules:
        return None
    pre = _first(modules, "head_drop", "fc_norm")
    heads = [p for p in ("head", "head_dist") if p in modules]
    return ["patch_embed", *_children(modules, "blocks"), *([pre] if pre else []), *heads]


def _swin(modules: dict[str, nn.Module]) -> list[str] | None:
    blocks = _numbered(modules, r"layers\.\d+\.blocks\.\d+")
    if "patch_embed" not in modules or not blocks:
        return None
    pre = _first(modules, "head.drop", "head.global_pool")
    logits = _first(modules, "head.fc", "head")
    return ["patch_embed", *blocks, *([pre] if pre else []), *([logits] if logits else [])]


def _resnet(modules: dict[str, nn.Module]) -> list[str] | None:
    stages = _numbered(modules, r"layer\d+")
    if not stages:
        return None
    stem = _first(modules, "maxpool", "act1", "relu")
    blocks = [b for s in stages for b in _children(modules, s)]
    pool = _first(modules, "global_pool", "avgpool")  # timm / torchvision
    fc = _first(modules, "fc")
    return [*([stem] if stem else []), *blocks, *([pool] if pool else []), *([fc] if fc else [])]


def _stem_blocks_head(modules: dict[str, nn.Module], blocks: str, pre: tuple[str, ...], logits: tuple[str, ...]
                      ) -> list[str] | None:
    """``stem``, every block whose path matches ``blocks``, then the first existing of ``pre`` (pre-logits) and of
    ``logits``: the preset of the staged timm CNNs (ConvNeXt, NFNet); None when the model is not one."""
    found = _numbered(modules, blocks)
    if "stem" not in modules or not found:
        return None
    tail = [_first(modules, *pre), _first(modules, *logits)]
    return ["stem", *found, *[p for p in tail if p]]


def _convnext(modules: dict[str, nn.Module]) -> list[str] | None:
    return _stem_blocks_head(modules, r"stages\.\d+\.blocks\.\d+", ("head.drop", "head.pre_logits"), ("head.fc",))


def _mixer(modules: dict[str, nn.Module]) -> list[str] | None:
    if "stem" not in modules or "blocks" not in modules:
        return None
    pre = _first(modules, "head_drop")
    return ["stem", *_children(modules, "blocks"), *([pre] if pre else []), *(["head"] if "head" in modules else [])]


def _nfnet(modules: dict[str, nn.Module]) -> list[str] | None:
    return _stem_blocks_head(modules, r"stages\.\d+\.\d+", ("head.drop", "head.global_pool"), ("head.fc",))


def _levit(modules: dict[str, nn.Module]) -> list[str] | None:
    blocks = _numbered(modules, r"stages\.\d+\.blocks\.\d+")
    if "stem" not in modules or not blocks:
        return None
    pre = _first(modules, "head.drop")
    heads = [p for p in ("head.linear", "head_dist.linear") if p in modules]
    if not heads:
        heads = [p for p in ("head", "head_dist") if p in modules]
    return ["stem", *blocks, *([pre] if pre else []), *heads]


def _efficientnet(modules: dict[str, nn.Module]) -> list[str] | None:
    blocks = _numbered(modules, r"blocks\.\d+\.\d+")
    if "conv_stem" not in modules or not blocks:
        return None
    stem = _first(modules, "bn1", "conv_stem")
    pool = _first(modules, "global_pool")
    logits = _first(modules, "classifier")
    return [stem, *blocks, *([pool] if pool else []), *([logits] if logits else [])]


_LAYER_LIST = re.compile(r"(.*\.)?(encoder\.)?(layers?|blocks)")


def _hf_vit(modules: dict[str, nn.Module]) -> list[str] | None:
    # transformers moves things between versions (4.x: vit.encoder.layer.i; 5.x: vit.layers.i), so the
    # preset is discovered: the longest ModuleList named layer(s) under the backbone, the embeddings
    # next to it, the final norm after it, and the classifier(s) outside the backbone.
    lists = [p for p, m in modules.items() if isinstance(m, nn.ModuleList) and _LAYER_LIST.fullmatch(p)]
    if not lists:
        return None
    layer_list = max(lists, key=lambda p: len(modules[p]))
    parent = layer_list.rsplit(".", 1)[0] if "." in layer_list else ""
    backbone = parent[: -len(".encoder")] if parent.endswith(".encoder") else (
        "" if parent == "encoder" else parent)
    join = (lambda name: f"{backbone}.{name}") if backbone else (lambda name: name)
    emb = _first(modules, join("embeddings"))
    if emb is None:
        return None
    norm = _first(modules, join("layernorm"), join("norm"), join("post_layernorm"), join("final_layernorm"),
                  parent + ".layernorm" if parent else "layernorm")
    # classifiers: modules outside the backbone holding the head (ViT: classifier; DeiT with teacher:
    # cls_classifier + distillation_classifier). The backbone's pooler is not a classifier.
    root = backbone.rsplit(".", 1)[0] if "." in backbone else ""
    heads = []
    if backbone:
        heads = [p for p in _children(modules, root) if p != backbone and "classifier" in p.rsplit(".", 1)[-1]]
    return [emb, *_children(modules, layer_list), *([norm] if norm else []), *heads]


def _generic(module: nn.Module) -> list[str]:
    """Children of the outermost *block containers*, plus the last Linear outside them.

    A block container is an ``nn.Sequential`` / ``nn.ModuleList`` with >= 2 children that are all composite
    modules (have submodules) and none of which is itself a plain container, e.g. ``encoder.layers``,
    ``layer1`` of a ResNet, a timm ``stages.i.blocks``. Without one, the children of the longest container;
    without any container, the top-level children. Order is registration order, which equals network
    order only for models that register modules in the order they call them.
    """
    modules = dict(module.named_modules())
    plain = (nn.Sequential, nn.ModuleList)

    def composite(m: nn.Module) -> bool:
        return next(m.children(), None) is not None

    chosen: list[str] = []
    for path, m in modules.items():
        if any(path.startswith(b + ".") or (b and path == b) for b in chosen):
            continue
        if isinstance(m, plain):
            kids = list(m.children())
            if len(kids) >= 2 and all(composite(k) and type(k) not in plain for k in kids):
                chosen.extend(_children(modules, path))
    if not chosen:
        containers = [(len(m), p) for p, m in modules.items() if isinstance(m, plain) and len(m) >= 2]
        if containers:
            longest = max(n for n, _ in containers)
            chosen = _children(modules, next(p for n, p in containers if n == longest))
        else:
            chosen = _children(modules, "")
    linears = [p for p, m in modules.items() if isinstance(m, nn.Linear)]
    if linears:
        last = linears[-1]
        if not any(last == c or last.startswith(c + ".") for c in chosen):
            chosen.append(last)
    return chosen


_PRESETS: dict[str, Callable[[dict[str, nn.Module]], list[str] | None]] = {
    "vit": _vit,
    "swin": _swin,
    "resnet": _resnet,
    "convnext": _convnext,
    "mixer": _mixer,
    "nfnet": _nfnet,
    "levit": _levit,
    "efficientnet": _efficientnet,
    "hf_vit": _hf_vit,
}


def default_layers(module: nn.Module, family: str) -> list[str]:
    """The family's preset: module paths in network order (stem, every block, pre-logits, logits).

    ``family`` is one of :data:`FAMILIES`. When ``module`` lacks the structure the family expects (a
    modified architecture), the generic rule is used instead, with a warning.
    """
    if family not in FAMILIES:
        raise UsageError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    if family == "generic":
        paths = _generic(module)
    else:
        modules = dict(module.named_modules())
        found = _PRESETS[family](modules)
        if found is None:
            warnings.warn(f"{type(module).__name__} does not have the {family} layout; using the generic layer rule",
                          stacklevel=2)
            paths = _generic(module)
        else:
            paths = found
    out: list[str] = []
    for p in paths:  # dedupe, keep order
        if p not in out:
            out.append(p)
    if not out:
        raise UsageError(f"found no layers to record in {type(module).__name__}; pass --layers explicitly")
    return out


# -- user patterns ------------------------------------------------------------------------------------------
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a path glob: ``**`` any characters, ``*`` / ``?`` within one component, ``[..]`` classes."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern[i + 1: i + 2] in ("!", "]") else i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1: j]
                body = "^" + body[1:] if body.startswith("!") else body
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j + 1
                continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def select_layers(module: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Module paths matching any of ``patterns`` (exact paths or globs), in registration order, no duplicates.
    (Selection from a model's modules before extraction; picking among a store's layers is
    :func:`repsim.measures.cka_engine.select_layers` / :func:`probes.features.select_layers`.)

    A pattern that matches nothing raises UsageError with the closest module names.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [n for n, _ in module.named_modules() if n]
    selected: set[str] = set()
    for raw in patterns:
        pat = raw.strip()
        if not pat:
            raise UsageError("empty layer pattern")
        if pat in names:
            selected.add(pat)
            continue
        rx = _glob_regex(pat) if any(ch in pat for ch in "*?[") else None
        hits = [n for n in names if rx.fullmatch(n)] if rx else []
        if not hits:
            close = difflib.get_close_matches(pat, names, n=5, cutoff=0.5)
            if not close:  # e.g. "block.*" for "blocks.*": compare the fixed prefix instead
                stem = re.split(r"[*?\[]", pat, maxsplit=1)[0].rstrip(".")
                close = difflib.get_close_matches(stem, names, n=5, cutoff=0.5) if stem else []
            hint = f"; did you mean {', '.join(close)}?" if close else "; see `repsim layers MODEL`"
            raise UsageError(f"layer pattern {pat!r} matches no module of {type(module).__name__}{hint}")
        selected.update(hits)
    return [n for n in names if n in selected]


# -- output layout ------------------------------------------------------------------------------------------
_SWIN_NHWC = re.compile(
    r"patch_embed(\.norm)?|norm|layers(\.\d+)?|layers\.\d+\.downsample(\.(norm|reduction))?"
    r"|layers\.\d+\.blocks(\.\d+)?|layers\.\d+\.blocks\.\d+\.(norm1|drop_path1)"
)
_CONVNEXT_INNER = re.compile(r"(stages\.\d+\.blocks\.\d+)\.(norm|mlp)(\..+)?")


def layer_layout(family: str, path: str, module: nn.Module | None = None) -> str:
    """"nhwc" when the module at ``path`` emits channels-last maps (B, H, W, C), else "auto".

    timm Swin keeps (B, H, W, C) between its blocks (patch embedding, stages, blocks, final norm; not the
    windowed attention or the (B, H*W, C) MLP). ConvNeXt blocks without ``conv_mlp`` apply their norm and
    MLP channels-last; pass ``module`` to resolve that per block (without it the standard ConvNeXt
    T/S/B/L layout, channels-last, is assumed). With ``module`` given, torchvision's Swin (all of
    ``features`` after the patch convolution, and ``norm``) and ConvNeXt block interiors are resolved too;
    without it they read "auto". Block outputs of every preset are channels-first.
    """
    if family == "swin":
        return "nhwc" if _SWIN_NHWC.fullmatch(path) else "auto"
    if family == "convnext":
        m = _CONVNEXT_INNER.fullmatch(path)
        if m is None:
            return "auto"
        if module is not None:
            try:
                block = module.get_submodule(m.group(1))
            except AttributeError:
                return "auto"
            return "auto" if getattr(block, "use_conv_mlp", False) else "nhwc"
        return "nhwc"
    if module is not None:
        # torchvision's Swin and ConvNeXt have no preset family but the same channels-last interiors
        origin = type(module).__module__
        if origin.startswith("torchvision.models.swin_transformer"):
            return "nhwc" if _TV_SWIN_NHWC.fullmatch(path) and path != "features.0.0" else "auto"
        if origin.startswith("torchvision.models.convnext"):
            return "nhwc" if _TV_CONVNEXT_NHWC.fullmatch(path) else "auto"
    return "auto"


_TV_SWIN_NHWC = re.compile(r"features(\..+)?|norm")
_TV_CONVNEXT_NHWC = re.compile(r"features\.\d+\.\d+\.block\.[1-5]")  # between the two Permute modules


def infer_family(module: nn.Module) -> str:
    """The preset family of a built model, from its class (timm classes; torchvision ResNet); else "generic".

    Only classes defined by timm or torchvision count (a user's own ``ResNet`` class has other module
    names), and the module must also have the family's structure.
    """
    for cls in type(module).__mro__:
        if not cls.__module__.startswith(("timm.", "torchvision.")):
            continue
        fam = _CLASS_FAMILY.get(cls.__name__)
        if fam is not None:
            if _PRESETS[fam](dict(module.named_modules())) is not None:
                return fam
            break
    return "generic"


_CLASS_FAMILY = {
    "VisionTransformer": "vit",  # timm ViT, DeiT, DINO, DINOv2, CLIP, MAE (and subclasses)
    "VisionTransformerDistilled": "vit",
    "Beit": "vit",
    "Eva": "vit",
    "SwinTransformer": "swin",
    "SwinTransformerV2": "swin",
    "ResNet": "resnet",  # timm.models.resnet.ResNet and torchvision.models.ResNet
    "ConvNeXt": "convnext",
    "MlpMixer": "mixer",
    "NormFreeNet": "nfnet",
    "Levit": "levit",
    "LevitDistilled": "levit",
    "EfficientNet": "efficientnet",
}
