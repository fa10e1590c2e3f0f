"""Capture of attention *probabilities* (after softmax, masks and relative position bias; before dropout).

:class:`AttentionCapture` is a context manager: inside ``with AttentionCapture(model) as cap:`` every forward
pass appends, per attention layer, one :class:`AttentionRecord` holding a float32 probability tensor and the
geometry needed to read its tokens (prefix-token count, patch grid, token stride in pixels; for Swin the
window → stage-grid position of every window token). :func:`find_attention_layers` lists what can be
captured, with its static geometry, without running anything.

How the probabilities are reached, per family (all of them leave the model's outputs unchanged):

``timm_vit`` / ``timm_rope`` / ``timm_beit`` / ``timm_eva`` (timm ``layers.Attention`` — used by ViT, DeiT,
    DINO(v2, with registers), CLIP, MAE… —, ``layers.AttentionRope``, ``models.beit.Attention`` with its
    relative position bias, ``models.eva.EvaAttention`` with RoPE)
    these compute ``attn = softmax(q k^T * scale + bias/mask); attn = self.attn_drop(attn)`` when
    ``fused_attn`` is False, and ``F.scaled_dot_product_attention`` (which never materialises the map)
    otherwise. During the capture ``fused_attn`` is set to False on exactly these modules (restored on exit)
    and a forward *pre*-hook on ``attn_drop`` takes its input: the probabilities, before dropout.
``timm_swin_window`` / ``timm_swinv2_window`` (timm ``swin_transformer.WindowAttention`` /
    ``swin_transformer_v2.WindowAttention``)
    same ``attn_drop`` pre-hook (v1 has a ``fused_attn`` switch, v2 none). The parent block's input gives
    the stage grid (H, W) at run time and its ``window_size`` / ``shift_size`` the partition. ``probs`` is
    (B, nW, heads, ws², ws²); ``positions`` (nW, ws², 2) is each window token's (row, col) in the stage grid
    with the cyclic shift undone (timm rolls by −shift before partitioning, so the token at shifted
    position p came from (p + shift) mod G; padding is appended *after* the roll); ``padded`` (nW, ws²)
    marks the zero tokens timm appends when the grid is not a multiple of the window (their positions
    are (−1, −1)). Pairs split by the shift mask get timm's additive −100, so their probability is
    ~e⁻¹⁰⁰ (≈ 0 in float32) rather than exactly 0.
``timm_like`` (any other module with a bool ``fused_attn``, an ``attn_drop`` sub-module and ``num_heads``,
    e.g. CaiT class attention, relative-position ViTs)
    same mechanism, but each captured tensor is checked at run time (4-d, ``num_heads`` heads, rows ≥ 0
    summing to 1) and a mismatch raises :class:`~repsim.errors.UsageError` instead of recording a wrong map.
    timm's ``DiffAttention`` (difference of two softmaxes: not a probability map) is refused.
timm ViT zoo (each family's geometry is documented on its discovery function below)
    ``timm_levit`` / ``timm_levit_subsample`` (LeViT, Graham et al. 2021) and ``timm_talking_heads`` (CaiT's
    self-attention, Touvron et al. 2021; the per-head softmax maps, before the post-softmax ``proj_w`` head
    mixing of Shazeer et al. 2020) have no module after their softmax: their ``forward`` is wrapped (restored
    on exit) to run under a :class:`torch.overrides.TorchFunctionMode` that keeps the one softmax output (the
    LeViT biases are inside it). ``timm_gpsa`` / ``timm_convit_mhsa`` (ConViT, d'Ascoli et al. 2021: the
    gated mixture of content and positional attention, renormalised, is what reaches ``attn_drop``),
    ``timm_class_attn`` (CaiT class attention) and ``timm_cross_attn`` (CrossViT, Chen et al. 2021) and the
    Twins layers ``timm_twins_local`` / ``timm_twins_global`` (Chu et al. 2021) use the ``attn_drop``
    pre-hook. PiT (Heo et al. 2021) uses timm ``Attention`` with per-stage grids. XCiT's XCA (El-Nouby et al.
    2021) is refused: it attends over channels, not tokens.
``hf_eager`` (Hugging Face transformers ≥ 5 models whose ``_can_record_outputs["attentions"]`` names an
    attention class: ViT, DeiT, DINOv2 (+registers), BEiT, CLIP, SigLIP, ViT-MAE, …)
    the attention implementation is switched to ``"eager"`` (``PreTrainedModel.set_attn_implementation``;
    every touched config's ``_attn_implementation`` is restored on exit) and a forward hook takes the
    weights the attention module returns (output index 1, as transformers' own recorder does). In eval mode
    that is the softmax output; in training mode with attention dropout > 0 transformers returns the maps
    *after* dropout. HF Swin (recorded per stage) is not supported: use timm's Swin.
``torch_mha`` (``torch.nn.MultiheadAttention``, e.g. torchvision's ViT)
    the module's ``forward`` is wrapped (restored on exit) to run with ``need_weights=True,
    average_attn_weights=False``; the per-head weights (B, heads, L, S) are recorded (batch first whatever
    ``batch_first`` is), and the caller gets what it asked for: ``None``, head-averaged or per-head weights.
    ``torch.backends.mha`` fast path is switched off meanwhile (it is process-global: do not run other
    MHA models in other threads during a capture); note that ``nn.TransformerEncoder``'s fast path zeroes
    the outputs at padded positions of a ``src_key_padding_mask`` while the regular path computes them.
    In training mode with dropout > 0 the weights are those after dropout (torch returns no other).
    The token layout of an MHA layer cannot be known in general: declare it on the model
    (``model.repsim_geometry = {"grid": (gh, gw), "num_prefix_tokens": 1, "patch_size": 16}``, see
    :mod:`hooks.models.geometry`; ``repsim extract --grid/--prefix-tokens/--patch-size`` set it) or pass
    ``geometry``; torchvision ``VisionTransformer`` models are recognised (one class token, the ``conv_proj``
    grid).

Geometry is read from the model, never guessed from sqrt(N − 1): a ``repsim_geometry`` attribute declared on
the nearest module above the layer (:mod:`hooks.models.geometry`; it comes first), timm's ``num_prefix_tokens`` and
``patch_embed`` (``grid_size``, ``patch_size``), the HF embeddings' ``cls_token`` / ``class_embedding`` /
``distillation_token`` / ``register_tokens`` and patch convolution, Swin blocks' ``input_resolution`` and the
model's ``feature_info`` reductions. At run time the grid of global-attention records comes from the output
shape of the patch-embedding convolution (so dynamic image sizes are right); when a record's token count
does not equal ``num_prefix_tokens + gh * gw`` (patch dropout, MAE masking, pooling attention) its
``num_prefix_tokens`` and ``grid`` are None.

Probabilities are computed in the model's dtype and converted to float32: a bf16/fp16 model gives bf16/fp16
precision maps.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from hooks.models.geometry import GEOMETRY_ATTR, declared_geometry
from repsim.errors import UsageError

Pair = tuple[int, int]

#: (module, qualname) of the timm classes whose computation was checked by hand, → kind
_TIMM_KNOWN: dict[tuple[str, str], str] = {
    ("timm.layers.attention", "Attention"): "timm_vit",
    ("timm.models.vision_transformer", "Attention"): "timm_vit",  # timm < 1.0.16 kept its own copy
    ("timm.layers.attention", "AttentionRope"): "timm_rope",
    ("timm.models.beit", "Attention"): "timm_beit",
    ("timm.models.eva", "EvaAttention"): "timm_eva",
    ("timm.models.swin_transformer", "WindowAttention"): "timm_swin_window",
    ("timm.models.swin_transformer_v2", "WindowAttention"): "timm_swinv2_window",
    ("timm.models.levit", "Attention"): "timm_levit",
    ("timm.models.levit", "AttentionDownsample"): "timm_levit_subsample",
    ("timm.models.cait", "TalkingHeadAttn"): "timm_talking_heads",
    ("timm.models.cait", "ClassAttn"): "timm_class_attn",
    ("timm.models.convit", "GPSA"): "timm_gpsa",
    ("timm.models.convit", "MHSA"): "timm_convit_mhsa",
    ("timm.models.crossvit", "CrossAttention"): "timm_cross_attn",
    ("timm.models.twins", "LocallyGroupedAttn"): "timm_twins_local",
    ("timm.models.twins", "GlobalSubSampleAttn"): "timm_twins_global",
}
_XCIT_REFUSAL = ("XCiT's cross-covariance attention (XCA) attends over channels, not tokens (a channel × channel map "
                 "per head, no token-to-token attention) and its local patch interaction is a convolution: XCiT has "
                 "no token attention map to capture (its two class-attention layers alone would misdescribe it)")
_TIMM_REFUSED: dict[tuple[str, str], str] = {
    ("timm.layers.diff_attention", "DiffAttention"):
        "differential attention (softmax₁ − λ·softmax₂) is not a probability map",
    ("timm.models.xcit", "XCA"): _XCIT_REFUSAL,
}
#: kinds whose probabilities are taken from the one softmax their forward computes (no attn_drop to tap)
SOFTMAX_KINDS = ("timm_levit", "timm_levit_subsample", "timm_talking_heads")
#: kinds whose single query is the class token (a CLS-to-patch map, :func:`repsim.attention.statistics.class_attention_statistics`)
CLASS_KINDS = ("timm_class_attn", "timm_cross_attn")
#: kinds whose queries lie on another grid than their keys (``AttentionLayer.query_grid``)
CROSS_GRID_KINDS = ("timm_levit_subsample", "timm_twins_global")
WINDOW_KINDS = ("timm_swin_window", "timm_swinv2_window", "timm_twins_local")
KINDS = (*sorted(set(_TIMM_KNOWN.values()) - set(WINDOW_KINDS)), *WINDOW_KINDS, "timm_like", "hf_eager",
         "torch_mha")


@dataclass
class AttentionLayer:
    """One capturable attention module and the static geometry of its tokens.

    path : module path (``named_modules`` name)
    kind : one of :data:`KINDS` (see the module docstring for the mechanism of each)
    num_heads : attention heads
    num_prefix_tokens : class / distillation / register tokens ahead of the patch tokens (0 for Swin windows);
        None when unknown (an MHA layer without ``geometry``)
    grid : (gh, gw) of the patch tokens at the size the model was built for (for Swin: the stage grid,
        ``input_resolution``); records carry the grid of each actual forward
    patch_size : (ph, pw), the token stride in input pixels (for Swin: the stage's reduction)
    window_size, shift_size : Swin / Twins window and cyclic shift (rows, cols); None for global attention
    stage : Swin stage path (``layers.0``), None otherwise
    module_type : the module's class, ``module.qualname``
    query_grid, query_patch_size : the queries' grid and token stride (px) when they are not the keys' (LeViT
        subsampling attention, Twins' global sub-sampled attention: ``grid`` / ``patch_size`` are then the
        keys'); None for self-attention
    class_query : the only query is the class token (CaiT class attention, CrossViT cross-attention): records
        are CLS-to-patch maps (B, heads, 1, num_prefix_tokens + gh·gw)
    class_token : whether the first prefix token is a class token (False for register tokens alone, e.g. timm
        ``vit_*_reg4_gap``: the query map is then the mean over patch queries); None when the model does not say
        (a prefix token is then taken to be the class token, as in every ViT family repsim knows)

    ``patch_size`` may be fractional (CrossViT's second branch sees the input resized: 16 px of 224 are
    17.14 px of a 240-px input).
    """

    path: str
    kind: str
    num_heads: int | None
    num_prefix_tokens: int | None
    grid: Pair | None
    patch_size: Pair | None
    window_size: Pair | None = None
    shift_size: Pair | None = None
    stage: str | None = None
    module_type: str = ""
    query_grid: Pair | None = None
    query_patch_size: Pair | None = None
    class_query: bool = False
    class_token: bool | None = None

    @property
    def windowed(self) -> bool:
        return self.kind in WINDOW_KINDS

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("grid", "patch_size", "window_size", "shift_size", "query_grid", "query_patch_size"):
            d[k] = list(d[k]) if d[k] is not None else None
        return d


@dataclass
class AttentionRecord:
    """The attention probabilities of one call of one attention layer.

    probs : float32; global attention (B, heads, N, S) (S = N for self-attention); Swin windows
        (B, nW, heads, ws², ws²)
    forward_index : which forward pass of the captured root module (0, 1, … since the capture began)
    call_index : which call of this layer within that forward pass (0 unless the module is reused)
    num_prefix_tokens, grid : token layout of this call (``grid`` = stage grid (H, W) for Swin); None when
        the token count does not match the model's geometry or it is unknown
    patch_size : (ph, pw) token stride in input pixels, or None
    positions : Swin only, long (nW, ws², 2): (row, col) of every window token in the stage grid after
        undoing the cyclic shift; (−1, −1) for padded tokens
    padded : Swin only, bool (nW, ws²): tokens timm appended as padding
    window_size, shift_size : Swin only, as used in this call
    query_positions : cross-grid layers (LeViT subsampling, Twins global sub-sampled attention) only, float64
        (Nq, 2): each patch query's centre in *key-grid steps* (key cell (i, j) centred at (i, j)); ``probs``
        is then (B, heads, Nq, gh·gw) with ``grid`` / ``patch_size`` the keys' (see :mod:`repsim.attention.statistics`,
        "Queries and keys on different grids")
    query_grid, query_patch_size : cross-grid layers: the queries' grid and stride (px)
    class_query : the one query is the class token: ``probs`` (B, heads, 1, num_prefix_tokens + gh·gw), a
        CLS-to-patch map (:func:`repsim.attention.statistics.class_attention_statistics`)
    """

    path: str
    kind: str
    probs: torch.Tensor
    forward_index: int
    call_index: int
    num_prefix_tokens: int | None
    grid: Pair | None
    patch_size: Pair | None
    positions: torch.Tensor | None = None
    padded: torch.Tensor | None = None
    window_size: Pair | None = None
    shift_size: Pair | None = None
    query_positions: torch.Tensor | None = None
    query_grid: Pair | None = None
    query_patch_size: Pair | None = None
    class_query: bool = False

    def to(self, device: torch.device | str) -> "AttentionRecord":
        """A copy with its tensors on ``device`` (always a copy, never a view of the live tensors)."""
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, copy=True)

        return dataclasses.replace(self, probs=mv(self.probs), positions=mv(self.positions), padded=mv(self.padded),
                                   query_positions=mv(self.query_positions))


# ==========================================================================================================
# geometry
# ==========================================================================================================
def _pair(v: Any) -> Pair | None:
    if v is None:
        return None
    if isinstance(v, int):
        return (int(v), int(v))
    t = tuple(int(x) for x in v)
    return t if len(t) == 2 else None  # type: ignore[return-value]


@dataclass
class _Geometry:
    """Token layout of the global-attention layers under one model (a timm model, an HF embeddings owner, a
    torchvision ViT); ``conv`` is the patch convolution whose output shape gives the grid at run time."""

    num_prefix_tokens: int | None
    grid: Pair | None
    patch_size: Pair | None
    conv: nn.Module | None = None
    runtime_grid: Pair | None = field(default=None, repr=False)
    class_token: bool | None = None  # the first prefix token is a class token (None: not known)

    def current_grid(self) -> Pair | None:
        return self.runtime_grid if self.runtime_grid is not None else self.grid


def _timm_geometry(owner: nn.Module) -> _Geometry:
    pe = owner.patch_embed
    prefix = int(getattr(owner, "num_prefix_tokens", 0) or 0)
    conv = getattr(pe, "proj", None)
    # timm's VisionTransformer keeps ``cls_token = None`` when built with class_token=False (registers only)
    class_token = isinstance(owner.cls_token, torch.Tensor) if hasattr(owner, "cls_token") else None
    return _Geometry(prefix, _pair(getattr(pe, "grid_size", None)), _pair(getattr(pe, "patch_size", None)),
                     conv if isinstance(conv, nn.Conv2d) else None, class_token=class_token)


def _hf_embeddings(owner: nn.Module) -> nn.Module | None:
    emb = getattr(owner, "embeddings", None)
    if isinstance(emb, nn.Module) and any(isinstance(m, nn.Conv2d) for m in emb.modules()):
        return emb
    return None


def _hf_geometry(owner: nn.Module) -> _Geometry:
    emb = _hf_embeddings(owner)
    assert emb is not None
    prefix = 0
    for attr in ("cls_token", "class_embedding", "distillation_token"):
        if isinstance(getattr(emb, attr, None), torch.Tensor):
            prefix += 1
    class_token = any(isinstance(getattr(emb, attr, None), torch.Tensor) for attr in ("cls_token", "class_embedding"))
    reg = getattr(emb, "register_tokens", None)
    if isinstance(reg, torch.Tensor):
        prefix += int(reg.shape[-2]) if reg.ndim >= 2 else 1
    conv = next(m for m in emb.modules() if isinstance(m, nn.Conv2d))
    patch = _pair(conv.stride)
    cfg = getattr(owner, "config", None)
    img = _pair(getattr(cfg, "image_size", None)) if cfg is not None else None
    grid = None
    if img is not None and patch is not None:
        k, p = _pair(conv.kernel_size), _pair(conv.padding)
        if k is not None and p is not None and isinstance(conv.padding, (tuple, list)):
            grid = tuple((img[i] + 2 * p[i] - k[i]) // patch[i] + 1 for i in range(2))  # type: ignore[assignment]
    return _Geometry(prefix, grid, patch, conv, class_token=class_token)


def _is_tv_vit(owner: nn.Module) -> bool:
    return (isinstance(getattr(owner, "class_token", None), torch.Tensor)
            and isinstance(getattr(owner, "conv_proj", None), nn.Conv2d) and hasattr(owner, "patch_size")
            and hasattr(owner, "image_size"))


def _tv_geometry(owner: nn.Module) -> _Geometry:
    p = int(owner.patch_size)
    g = int(owner.image_size) // p
    return _Geometry(1, (g, g), (p, p), owner.conv_proj, class_token=True)


def _declared_geometry(owner: nn.Module) -> _Geometry:
    """A user model's declared layout (``repsim_geometry``, :mod:`hooks.models.geometry`): static, no patch conv."""
    g = declared_geometry(owner)
    assert g is not None
    return _Geometry(g.num_prefix_tokens, g.grid, g.patch_size)


def _geometry_owner(modules: Mapping[str, nn.Module], path: str) -> tuple[str, nn.Module, str] | None:
    """The nearest ancestor of ``path`` that defines the token layout: (its path, it, "declared" | "timm" | "hf" |
    "tv"); at each level a declared ``repsim_geometry`` attribute comes first."""
    parts = path.split(".") if path else []
    for i in range(len(parts) - 1, -1, -1):
        p = ".".join(parts[:i])
        mod = modules[p]
        if getattr(mod, GEOMETRY_ATTR, None) is not None:
            return p, mod, "declared"
        if isinstance(getattr(mod, "patch_embed", None), nn.Module):
            return p, mod, "timm"
        if _hf_embeddings(mod) is not None:
            return p, mod, "hf"
        if _is_tv_vit(mod):
            return p, mod, "tv"
    return None


def _geometry_arg(value: Any, what: str) -> tuple[int | None, Pair | None, Pair | None]:
    try:
        prefix, grid, patch = value
    except (TypeError, ValueError):
        raise UsageError(f"geometry for {what} must be (num_prefix_tokens, (gh, gw), patch_size), got {value!r}"
                         ) from None
    return (None if prefix is None else int(prefix)), _pair(grid), _pair(patch)


# ==========================================================================================================
# discovery
# ==========================================================================================================
@dataclass
class _Found:
    layer: AttentionLayer
    module: nn.Module
    geometry: _Geometry | None = None  # global attention
    block: nn.Module | None = None  # Swin: the block that partitions windows
    hf_index: int = 1  # hf_eager: output index of the weights
    prefix: int | None = None  # overrides geometry.num_prefix_tokens (CaiT talking heads, ConViT GPSA: 0)
    #: family layers (LeViT, Twins, CrossViT cross-attention): the record's geometry from the probabilities
    resolve: Callable[[torch.Tensor], dict[str, Any]] | None = None
    #: forward pre-hooks (with kwargs) to install on the attention module itself (Twins: the stage size)
    pre_hooks: list[Callable[..., None]] = field(default_factory=list)


def _qual(m: nn.Module) -> tuple[str, str]:
    return type(m).__module__, type(m).__qualname__


def _num_heads(m: nn.Module) -> int | None:
    for attr in ("num_heads", "num_attention_heads"):
        v = getattr(m, attr, None)
        if isinstance(v, int):
            return v
    cfg = getattr(m, "config", None)
    v = getattr(cfg, "num_attention_heads", None)
    return v if isinstance(v, int) else None


def _timm_like(m: nn.Module) -> bool:
    return (isinstance(getattr(m, "fused_attn", None), bool) and isinstance(getattr(m, "attn_drop", None), nn.Module)
            and isinstance(getattr(m, "num_heads", None), int))


def _hf_specs(pm: nn.Module) -> list[tuple[type | None, str | None, str | None, int]]:
    """(target class, class-name suffix, layer name, output index) of an HF model's "attentions" recorder."""
    specs = getattr(pm, "_can_record_outputs", None) or {}
    entry = specs.get("attentions") if isinstance(specs, Mapping) else None
    if entry is None:
        return []
    out = []
    for spec in entry if isinstance(entry, list) else [entry]:
        if isinstance(spec, type):
            out.append((spec, None, None, 1))
        elif isinstance(spec, str):
            out.append((None, spec, None, 1))
        else:  # transformers.utils.output_capturing.OutputRecorder
            out.append((getattr(spec, "target_class", None), getattr(spec, "class_name", None),
                        getattr(spec, "layer_name", None), int(getattr(spec, "index", 1))))
    return out


def _hf_match(spec: tuple[type | None, str | None, str | None, int], path: str, m: nn.Module) -> bool:
    target, cname, lname, _ = spec
    ok = (target is not None and isinstance(m, target)) or (cname is not None and path.endswith(cname))
    if ok and lname is not None:
        ok = "." + lname.strip(".") + "." in "." + path + "."
    return ok


def _hf_pretrained_type() -> type | None:
    try:
        from transformers import PreTrainedModel
    except Exception:  # noqa: BLE001 - transformers absent or broken: no HF models then
        return None
    return PreTrainedModel


def _discover(module: nn.Module, geometry: Any = None) -> tuple[list[_Found], list[str]]:
    """Capturable attention layers in network order, and descriptions of attention-like modules that are not."""
    modules = dict(module.named_modules())
    hf_paths, hf_refused = _hf_attention_paths(modules)
    unsupported = list(hf_refused.values())
    geometries = _GeometryCache(modules)
    found: list[_Found] = []
    for path, m in modules.items():
        if path in hf_refused:
            continue
        kind, refusal = _attention_kind(path, m, hf_paths)
        if refusal is not None:
            unsupported.append(f"{path} ({'.'.join(_qual(m))}: {refusal})")
        elif kind is not None:
            found.append(_found_layer(modules, path, m, kind, hf_paths.get(path, 1), geometries))

    covered = [f.layer.path for f in found] + sorted(hf_refused) + [u.split(" ", 1)[0] for u in unsupported]
    unsupported += _unknown_attention(modules, covered)
    if any(_qual(m) == ("timm.models.xcit", "XCA") for m in modules.values()):
        return [], [f"{type(module).__name__}: {_XCIT_REFUSAL}"]
    if geometry is not None:  # explicit geometry (MHA layers, or overrides)
        _apply_geometry(found, geometry)
    return found, unsupported


#: how each kind of geometry owner (:func:`_geometry_owner`) gives its token layout
_OWNER_GEOMETRY: dict[str, Callable[[nn.Module], _Geometry]] = {
    "declared": _declared_geometry, "timm": _timm_geometry, "hf": _hf_geometry, "tv": _tv_geometry,
}


class _GeometryCache:
    """The token geometries of one discovery, each read once and shared by every layer it applies to: the
    capture sets a forward's grid on the shared :class:`_Geometry` (``runtime_grid``, one hook per patch
    convolution), so all layers under one owner must hold the same object."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.modules = modules
        self._by_owner: dict[int, _Geometry] = {}
        self._by_family: dict[tuple[Any, ...], _Geometry] = {}

    def of_owner(self, path: str) -> tuple[_Geometry | None, str | None]:
        """(geometry of the nearest owner above ``path``, its kind: declared | timm | hf | tv), (None, None)
        without one."""
        owner = _geometry_owner(self.modules, path)
        if owner is None:
            return None, None
        _p, mod, src = owner
        if id(mod) not in self._by_owner:
            self._by_owner[id(mod)] = _OWNER_GEOMETRY[src](mod)
        return self._by_owner[id(mod)], src

    def family(self, key: tuple[Any, ...], make: Callable[[], _Geometry]) -> _Geometry:
        """The geometry of a family's stage / branch ``key`` (see :func:`_family_found`), made once."""
        if key not in self._by_family:
            self._by_family[key] = make()
        return self._by_family[key]


def _hf_recorded_modules(modules: Mapping[str, nn.Module], root_path: str,
                         spec: tuple[type | None, str | None, str | None, int]) -> list[tuple[str, nn.Module]]:
    """(path, module) of the modules at or under ``root_path`` that an HF "attentions" recorder ``spec`` names."""
    return [(path, m) for path, m in modules.items()
            if (not root_path or path == root_path or path.startswith(root_path + ".")) and _hf_match(spec, path, m)]


def _hf_attention_paths(modules: Mapping[str, nn.Module]) -> tuple[dict[str, int], dict[str, str]]:
    """Hugging Face: the modules each PreTrainedModel's own output recorder names as "attentions", as
    ({path: output index of the weights}, {path: why it is refused}); a recorder of another class than an
    attention (HF Swin records per stage) is refused."""
    pretrained = _hf_pretrained_type()
    hf_paths: dict[str, int] = {}
    refused: dict[str, str] = {}
    if pretrained is None:
        return hf_paths, refused
    for root_path, pm in modules.items():
        if not isinstance(pm, pretrained):
            continue
        for spec in _hf_specs(pm):
            target = spec[0]
            tname = target.__name__ if target is not None else (spec[1] or "")
            for path, m in _hf_recorded_modules(modules, root_path, spec):
                if path in hf_paths or path in refused:
                    continue
                if "Attention" in tname:
                    hf_paths[path] = spec[3]
                else:
                    refused[path] = (f"{path} ({type(m).__name__}: transformers records its attentions per stage; "
                                     "use the timm model)")
    return hf_paths, refused


def _attention_kind(path: str, m: nn.Module, hf_paths: Mapping[str, int]) -> tuple[str | None, str | None]:
    """(kind, None) for a capturable attention module (:data:`KINDS`), (None, why) for one that is refused, and
    (None, None) for any other module. The first rule that applies decides: an HF recorded attention, a timm
    class refused or checked by hand, ``nn.MultiheadAttention``, a timm-like module, and last a module with a
    ``fused_attn`` switch but no ``attn_drop`` to tap."""
    qual = _qual(m)
    if path in hf_paths:
        return "hf_eager", None
    if qual in _TIMM_REFUSED:
        return None, _TIMM_REFUSED[qual]
    if qual in _TIMM_KNOWN:
        return _TIMM_KNOWN[qual], None
    if isinstance(m, nn.MultiheadAttention):
        return "torch_mha", None
    if _timm_like(m):
        return "timm_like", None
    if isinstance(getattr(m, "fused_attn", None), bool):
        return None, "computes attention without an attn_drop module to tap"
    return None, None


def _found_layer(modules: Mapping[str, nn.Module], path: str, m: nn.Module, kind: str, hf_index: int,
                 geometries: _GeometryCache) -> _Found:
    """The :class:`_Found` of attention module ``m`` of ``kind``: a timm family with its own geometry, a window
    attention, or a global attention laid out by its geometry owner."""
    heads = _num_heads(m)
    typename = ".".join(_qual(m))
    if kind.startswith("timm_"):
        fam = _family_found(modules, path, m, kind, heads, typename, geometries.family)
        if fam is not None:
            return fam
    if kind in WINDOW_KINDS:
        return _swin_found(modules, path, m, kind, heads, typename)
    g, src = geometries.of_owner(path)
    return _global_found(path, m, kind, heads, typename, g, src, hf_index)


def _global_found(path: str, m: nn.Module, kind: str, heads: int | None, typename: str, g: _Geometry | None,
                  src: str | None, hf_index: int) -> _Found:
    """A global attention layer laid out by the geometry ``g`` of its owner of kind ``src`` (see
    :meth:`_GeometryCache.of_owner`); ``hf_index``: output index of an HF layer's weights."""
    if kind == "torch_mha" and g is not None and src not in ("tv", "declared"):
        g = None  # an MHA inside a timm / HF model: its tokens are not necessarily the patch tokens
    # CaiT's self-attention blocks run before the class token is appended (Touvron et al. 2021 Sec. 3), and
    # ConViT's GPSA blocks before it is (d'Ascoli et al. 2021 Sec. 3): no prefix token there
    prefix = 0 if kind in ("timm_talking_heads", "timm_gpsa") else None
    n_prefix = prefix if prefix is not None else (g.num_prefix_tokens if g else None)
    return _Found(AttentionLayer(path, kind, heads, n_prefix, g.grid if g else None, g.patch_size if g else None,
                                 module_type=typename, class_query=kind in CLASS_KINDS,
                                 class_token=g.class_token if g is not None and n_prefix else None),
                  m, g, hf_index=hf_index, prefix=prefix)


def _unknown_attention(modules: Mapping[str, nn.Module], covered: Sequence[str]) -> list[str]:
    """Descriptions of the attention-looking modules (class name ending in Attention / Attn) that none of the
    ``covered`` paths (found, refused) is, holds or lies inside, e.g. a timm class repsim does not know."""
    covered = list(covered)

    def related(path: str) -> bool:
        return any(path == c or path.startswith(c + ".") or c.startswith(path + ".") or not path for c in covered)

    out = []
    for path, m in modules.items():
        if type(m).__name__.endswith(("Attention", "Attn")) and not related(path):
            out.append(f"{path} ({'.'.join(_qual(m))}: computes attention in a way repsim does not know)")
            covered.append(path)
    return out


def _geometry_overrides(geometry: Any, known: Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """(default geometry for MHA layers without one, {path: geometry}) of the ``geometry`` argument: one
    geometry (the default), or a mapping of layer paths (``"*"``: the default); refuses a path that is not one of
    the ``known`` capturable layers."""
    if not isinstance(geometry, Mapping):
        return geometry, {}
    unknown = [p for p in geometry if p != "*" and p not in known]
    if unknown:
        raise UsageError(f"geometry names {unknown[0]!r}, which is not a capturable attention layer "
                         f"(known: {', '.join(known) or 'none'})")
    return geometry.get("*"), {p: v for p, v in geometry.items() if p != "*"}


def _apply_geometry(found: list[_Found], geometry: Any) -> None:
    """Set the explicit ``geometry`` (see :class:`AttentionCapture`) on the layers it names, and the default on
    MHA layers without one; refuses overriding a layer whose geometry comes from the model (windows, families)."""
    default, items = _geometry_overrides(geometry, [f.layer.path for f in found])
    for f in found:
        value = items.get(f.layer.path)
        if value is None and default is not None and f.layer.kind == "torch_mha" and f.geometry is None:
            value = default
        if value is None:
            continue
        if f.layer.windowed or f.resolve is not None:
            raise UsageError(f"{f.layer.path} ({f.layer.kind}) has its geometry from the model; it cannot be "
                             "overridden")
        prefix, grid, patch = _geometry_arg(value, f.layer.path)
        f.geometry = _Geometry(prefix, grid, patch)
        f.layer.num_prefix_tokens, f.layer.grid, f.layer.patch_size = prefix, grid, patch


# ----------------------------------------------------------------------------------------------------------
# timm families with their own token geometry: LeViT, PiT, CrossViT, Twins (CaiT and ConViT need only a prefix)
# ----------------------------------------------------------------------------------------------------------
def _timm_root(modules: Mapping[str, nn.Module], path: str, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    """The nearest ancestor of ``path`` that is a timm model of one of the classes ``names``."""
    parts = path.split(".") if path else []
    for i in range(len(parts) - 1, -1, -1):
        p = ".".join(parts[:i])
        mod = modules[p]
        if type(mod).__module__.startswith("timm.") and any(c.__name__ in names for c in type(mod).__mro__):
            return p, mod
    return None


def _px(v: Sequence[float]) -> Pair:
    """A stride in pixels: ints when whole, else floats (CrossViT's resized branch)."""
    return tuple(int(round(x)) if abs(x - round(x)) < 1e-9 else float(x) for x in v)  # type: ignore[return-value]


def _conv_stride(mod: nn.Module) -> Pair:
    sh = sw = 1
    for c in mod.modules():
        if isinstance(c, nn.Conv2d):
            st = _pair(c.stride)
            sh, sw = sh * st[0], sw * st[1]
    return sh, sw


def _conv_out(grid: Pair, conv: nn.Conv2d) -> Pair:
    k, st, pd = _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.padding)
    return tuple((grid[i] + 2 * pd[i] - k[i]) // st[i] + 1 for i in range(2))  # type: ignore[return-value]


def _rel(path: str, root_path: str) -> list[str]:
    return (path[len(root_path) + 1:] if root_path else path).split(".")


def _levit_found(modules: Mapping[str, nn.Module], path: str, m: nn.Module, kind: str, heads: int | None,
                 typename: str) -> _Found:
    """LeViT (Graham et al. 2021, "LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference",
    Sec. 4.2): attention with learned per-head biases ``B[h, |Δy|, |Δx|]`` inside ``softmax``; no prefix token
    (the class head pools). The key grid is the module's ``resolution``; its stride is the stem's (16 px) times
    2 per ceil-halving of the stage-0 grid. The subsampling attention (``AttentionDownsample``, between stages)
    takes its queries from every ``stride``-th key token (timm's ``Downsample``: ``x[:, ::s, ::s]``, or a 3 × 3
    average pool centred there; the same ``q_pos`` timm's bias table uses), so query (r, c) sits at key-grid
    position (s·r, s·c)."""
    found = _timm_root(modules, path, ("Levit",))
    if found is None:
        raise UsageError(f"{path} ({typename}) is not inside a timm Levit model: repsim cannot place its tokens")
    root = found[1]
    stem = _conv_stride(root.stem)
    res = _pair(m.resolution)
    assert res is not None
    first = max((_pair(x.resolution) for x in root.modules()
                 if _qual(x) in (("timm.models.levit", "Attention"), ("timm.models.levit", "AttentionDownsample"))),
                key=lambda r: r[0] * r[1])
    halvings, cur = 0, first
    while cur != res and halvings < 16:
        cur, halvings = (-(-cur[0] // 2), -(-cur[1] // 2)), halvings + 1
    if cur != res:
        raise UsageError(f"{path}: LeViT resolution {res} is not a halving of the stage-0 grid {first}")
    key_px = (stem[0] * 2 ** halvings, stem[1] * 2 ** halvings)
    if kind == "timm_levit_subsample":
        st = int(m.stride)
        qgrid = (-(-res[0] // st), -(-res[1] // st))
        from repsim.attention.statistics import grid_positions

        qpos = (grid_positions(qgrid) * st).to(torch.float64)
        layer = AttentionLayer(path, kind, heads, 0, res, key_px, module_type=typename, query_grid=qgrid,
                               query_patch_size=(key_px[0] * st, key_px[1] * st))
        geo = dict(num_prefix_tokens=0, grid=res, patch_size=key_px, query_positions=qpos, query_grid=qgrid,
                   query_patch_size=layer.query_patch_size)
    else:
        layer = AttentionLayer(path, kind, heads, 0, res, key_px, module_type=typename)
        geo = dict(num_prefix_tokens=0, grid=res, patch_size=key_px)
    return _Found(layer, m, resolve=lambda probs, geo=geo: dict(geo))


class _StageGrid:
    """A grid read at run time from a module's 4-d output (or input), with its static value as fallback."""

    def __init__(self, static: Pair | None):
        self.static = static
        self.runtime: Pair | None = None

    def current(self) -> Pair | None:
        return self.runtime if self.runtime is not None else self.static


def _pit_geometry(root: nn.Module, stage: int) -> _Geometry:
    """PiT (Heo et al. 2021, "Rethinking Spatial Dimensions of Vision Transformers", Sec. 3.2): stage 0 is the
    overlapping patch convolution's grid (kernel 16, stride 8 at 224 px: 27 × 27, stride 8 px); each later
    stage starts with a depth-wise stride-2 pooling convolution (grid (g + 2p - k) // s + 1, stride × 2);
    ``num_tokens`` class (+ distillation) tokens are carried through the stages."""
    pe_conv = root.patch_embed.conv
    grid = (int(root.patch_embed.height), int(root.patch_embed.width))
    stride = _pair(pe_conv.stride)
    conv = pe_conv
    for i in range(1, stage + 1):
        pool = root.transformers[i].pool
        conv = pool.conv
        grid = _conv_out(grid, conv)
        st = _pair(conv.stride)
        stride = (stride[0] * st[0], stride[1] * st[1])
    return _Geometry(int(getattr(root, "num_tokens", 1)), grid, stride, conv)


def _crossvit_geometry(root: nn.Module, branch: int) -> _Geometry:
    """CrossViT (Chen et al. 2021, "CrossViT: Cross-Attention Multi-Scale Vision Transformer", Sec. 3): each
    branch has its own patch embedding and class token; a branch whose image size differs from the input's
    sees the input resized (bicubic) first, so its token stride in *input* pixels is patch × input / branch
    size (16 × 240 / 224 = 17.14 px for the second branch of ``crossvit_*_240``)."""
    pe = root.patch_embed[branch]
    img, bimg, patch = _pair(root.img_size), _pair(pe.img_size), _pair(pe.patch_size)
    assert img is not None and bimg is not None and patch is not None
    grid = (bimg[0] // patch[0], bimg[1] // patch[1])
    stride = _px((patch[0] * img[0] / bimg[0], patch[1] * img[1] / bimg[1]))
    return _Geometry(1, grid, stride, pe.proj)


def _twins_found(modules: Mapping[str, nn.Module], path: str, m: nn.Module, kind: str, heads: int | None,
                 typename: str) -> _Found:
    """Twins-SVT (Chu et al. 2021, "Twins: Revisiting the Design of Spatial Attention in Vision Transformers",
    Sec. 3.2): locally-grouped self-attention in non-overlapping ws × ws windows (timm pads the stage grid at
    the bottom / right to a multiple of ws, row-major windows as Swin's without shift), and global sub-sampled
    attention whose keys are a stride-``sr`` ``sr × sr`` convolution of the tokens (key grid
    (H // sr, W // sr), key (i, j) centred on query cells ``sr·i + (sr-1)/2``); no prefix token. The stage grid
    comes from the ``size`` argument of each call, the stride from the patch embeddings (4, 2, 2, 2 px)."""
    found = _timm_root(modules, path, ("Twins",))
    rel = _rel(path, found[0]) if found is not None else []
    if found is None or len(rel) < 3 or rel[0] != "blocks" or not rel[1].isdigit():
        raise UsageError(f"{path} ({typename}) is not a block attention of a timm Twins model: repsim cannot place "
                         "its tokens")
    root, stage = found[1], int(rel[1])
    sh = sw = 1
    for pe in list(root.patch_embeds)[:stage + 1]:
        p = _pair(pe.patch_size)
        sh, sw = sh * p[0], sw * p[1]
    pe = root.patch_embeds[stage]
    grid = _StageGrid((int(pe.H), int(pe.W)))

    def pre(_m: nn.Module, args: Any, kwargs: Any) -> None:
        size = args[1] if len(args) > 1 else kwargs.get("size")
        grid.runtime = (int(size[0]), int(size[1])) if size is not None else None

    stage_px = (sh, sw)
    if kind == "timm_twins_local":
        ws = (int(m.ws), int(m.ws))
        layer = AttentionLayer(path, kind, heads, 0, grid.static, stage_px, ws, (0, 0),
                               f"{found[0] + '.' if found[0] else ''}blocks.{stage}", typename)

        def resolve(probs: torch.Tensor) -> dict[str, Any]:
            g = grid.current()
            pos, padded = swin_window_positions(g, ws, (0, 0), probs.device)
            if probs.ndim != 5 or probs.shape[1] != pos.shape[0] or probs.shape[-1] != pos.shape[1]:
                raise UsageError(f"{path}: window attention of shape {tuple(probs.shape)} does not match "
                                 f"{pos.shape[0]} windows of {ws[0]}x{ws[1]} on a {g[0]}x{g[1]} grid")
            return dict(num_prefix_tokens=0, grid=g, patch_size=stage_px, positions=pos, padded=padded,
                        window_size=ws, shift_size=(0, 0))

        return _Found(layer, m, resolve=resolve, pre_hooks=[pre])
    sr = int(getattr(m, "sr_ratio", 1) or 1)
    if sr == 1:  # the last stage: plain global self-attention
        layer = AttentionLayer(path, kind, heads, 0, grid.static, stage_px, module_type=typename)
        return _Found(layer, m, resolve=lambda probs: dict(num_prefix_tokens=0, grid=grid.current(),
                                                           patch_size=stage_px), pre_hooks=[pre])
    key_px = (sh * sr, sw * sr)

    def key_grid(g: Pair) -> Pair:
        return g[0] // sr, g[1] // sr

    layer = AttentionLayer(path, kind, heads, 0, key_grid(grid.static), key_px, module_type=typename,
                           query_grid=grid.static, query_patch_size=stage_px)
    cache: dict[Pair, torch.Tensor] = {}

    def resolve_global(probs: torch.Tensor) -> dict[str, Any]:
        g = grid.current()
        if g not in cache:
            from repsim.attention.statistics import grid_positions

            cache[g] = (grid_positions(g).to(torch.float64) - (sr - 1) / 2) / sr
        return dict(num_prefix_tokens=0, grid=key_grid(g), patch_size=key_px, query_positions=cache[g],
                    query_grid=g, query_patch_size=stage_px)

    return _Found(layer, m, resolve=resolve_global, pre_hooks=[pre])


def _family_found(modules: Mapping[str, nn.Module], path: str, m: nn.Module, kind: str, heads: int | None,
                  typename: str, geom: Callable[[tuple[Any, ...], Callable[[], _Geometry]], _Geometry]
                  ) -> _Found | None:
    """The _Found of a layer of a family with its own geometry, None for the generic path."""
    if kind in ("timm_levit", "timm_levit_subsample"):
        return _levit_found(modules, path, m, kind, heads, typename)
    if kind in ("timm_twins_local", "timm_twins_global"):
        return _twins_found(modules, path, m, kind, heads, typename)
    pit = _timm_root(modules, path, ("PoolingVisionTransformer",))
    if pit is not None:
        rel = _rel(path, pit[0])
        if len(rel) > 1 and rel[0] == "transformers" and rel[1].isdigit():
            st = int(rel[1])
            g = geom((id(pit[1]), "pit", st), lambda: _pit_geometry(pit[1], st))
            return _Found(AttentionLayer(path, kind, heads, g.num_prefix_tokens, g.grid, g.patch_size,
                                         module_type=typename), m, g)
    cross = _timm_root(modules, path, ("CrossVit",))
    if cross is not None:
        rel = _rel(path, cross[0])
        n_br = len(cross[1].patch_embed)
        branch = None
        if len(rel) > 3 and rel[0] == "blocks" and rel[2] in ("blocks", "fusion") and rel[3].isdigit():
            branch = int(rel[3]) if rel[2] == "blocks" else (int(rel[3]) + 1) % n_br  # fusion i: keys of i + 1
        if branch is None:
            raise UsageError(f"{path} ({typename}) is not a branch or fusion attention of CrossViT")
        g = geom((id(cross[1]), "crossvit", branch), lambda: _crossvit_geometry(cross[1], branch))
        layer = AttentionLayer(path, kind, heads, g.num_prefix_tokens, g.grid, g.patch_size, module_type=typename,
                               class_query=kind in CLASS_KINDS)
        return _Found(layer, m, g)
    return None


def _swin_found(modules: Mapping[str, nn.Module], path: str, m: nn.Module, kind: str, heads: int | None,
                typename: str) -> _Found:
    parent_path = path.rsplit(".", 1)[0] if "." in path else ""
    block = modules[parent_path]
    if not all(hasattr(block, a) for a in ("window_size", "shift_size", "input_resolution")):
        raise UsageError(f"{path} ({typename}) is not inside a Swin block with window_size / shift_size / "
                         "input_resolution: repsim cannot place its window tokens")
    stage, stride = None, None
    owner = _geometry_owner(modules, path)
    if owner is not None:
        best = ""
        for info in getattr(owner[1], "feature_info", None) or []:
            mod_name = info.get("module") if isinstance(info, Mapping) else None
            if not mod_name:
                continue
            full = f"{owner[0]}.{mod_name}" if owner[0] else mod_name
            if path.startswith(full + ".") and len(full) > len(best):
                best, stride = full, info.get("reduction")
        stage = best or None
    layer = AttentionLayer(path, kind, heads, 0, _pair(block.input_resolution), _pair(stride),
                           _pair(block.window_size), _pair(block.shift_size), stage, typename)
    return _Found(layer, m, None, block)


def find_attention_layers(module: nn.Module, *, geometry: Any = None) -> list[AttentionLayer]:
    """The attention layers of ``module`` that :class:`AttentionCapture` can record, in network order.

    ``geometry`` as in :class:`AttentionCapture`. An empty list means none (a CNN, or attention computed in a
    way repsim does not know).
    """
    return [f.layer for f in _discover(module, geometry)[0]]


# ==========================================================================================================
# Swin window positions
# ==========================================================================================================
def swin_window_positions(grid: Pair, window_size: Pair, shift_size: Pair,
                          device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (nW, wh*ww, 2) long, padded (nW, wh*ww) bool) of timm's Swin partition of a ``grid``.

    timm rolls the (H, W) map by −shift, pads it at the bottom / right to a multiple of the window and
    partitions it row-major into windows, each row-major. The token at padded-shifted position p is the
    original token (p + shift) mod (H, W) when p lies inside (H, W), else padding (position (−1, −1)).
    """
    (h, w), (wh, ww), (sh, sw) = grid, window_size, shift_size
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    nh, nw = hp // wh, wp // ww
    rows = torch.arange(hp, device=device).view(nh, 1, wh, 1).expand(nh, nw, wh, ww).reshape(nh * nw, wh * ww)
    cols = torch.arange(wp, device=device).view(1, nw, 1, ww).expand(nh, nw, wh, ww).reshape(nh * nw, wh * ww)
    padded = (rows >= h) | (cols >= w)
    pos = torch.stack(((rows + sh) % h, (cols + sw) % w), dim=-1)
    pos[padded] = -1
    return pos, padded


# ==========================================================================================================
# capture
# ==========================================================================================================
class AttentionCapture:
    """Context manager recording the attention probabilities of ``module``'s attention layers.

    Parameters
    ----------
    module : the model (timm, Hugging Face — bare or in :class:`hooks.models.hf_loader.HFImageModel` —, torchvision,
        or any module with supported attention layers); its train / eval mode is left as it is
    layers : paths of the layers to record (default: all of :func:`find_attention_layers`)
    geometry : token layout for layers whose layout cannot be read from the model (``torch_mha``), as
        ``(num_prefix_tokens, (gh, gw), patch_size)`` for all such layers, or ``{path: (...)}`` per layer
        (the key ``"*"`` giving a default for the others); a path given explicitly overrides the model's
        geometry for any global-attention layer
    callback : ``callback(path, record)`` called for each record as soon as it is computed, with its tensors
        on the model's device (reduce them to statistics there; they are not copied)
    store : keep the records in :attr:`records` (default: True without a callback, False with one)
    store_device : where kept records go (default "cpu"; None keeps the model's device)

    Inside the ``with`` block each forward call appends one :class:`AttentionRecord` per attention call to
    ``records[path]``; records stay available after the block. :meth:`clear` empties them. Raises
    :class:`~repsim.errors.UsageError` when the model has no attention layers repsim can capture.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        layers: Sequence[str] | None = None,
        geometry: Any = None,
        callback: Callable[[str, AttentionRecord], None] | None = None,
        store: bool | None = None,
        store_device: torch.device | str | None = "cpu",
    ):
        found, unsupported = _discover(module, geometry)
        name = _model_name(module)
        if not found:
            if unsupported:
                raise UsageError(f"model {name} has attention that repsim cannot capture: {'; '.join(unsupported[:3])}")
            raise UsageError(f"model {name} has no attention layers that repsim can capture")
        by_path = {f.layer.path: f for f in found}
        if layers is not None:
            layers = list(layers)
            missing = [p for p in layers if p not in by_path]
            if missing:
                raise UsageError(f"{missing[0]!r} is not an attention layer of {name}; attention layers: "
                                 f"{', '.join(list(by_path)[:6])}{', …' if len(by_path) > 6 else ''}")
            found = [by_path[p] for p in layers]
        elif unsupported:
            warnings.warn(f"{name}: not captured: {'; '.join(unsupported)}", stacklevel=2)
        self.module = module
        self._found = found
        self.layers: list[AttentionLayer] = [f.layer for f in found]
        self.callback = callback
        self.store = (callback is None) if store is None else bool(store)
        self.store_device = store_device
        self.records: dict[str, list[AttentionRecord]] = {f.layer.path: [] for f in found}
        self.num_forwards = 0
        self._batch: int | None = None  # images in the root forward under way
        self._calls: dict[str, int] = {}
        self._handles: list[Any] = []
        self._undo: list[Callable[[], None]] = []
        self._swin_inputs: dict[str, Pair] = {}
        self._swin_cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._active = False

    # -- results ----------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Drop the kept records (the forward counter goes on)."""
        for recs in self.records.values():
            recs.clear()

    # -- setup / teardown -------------------------------------------------------------------------------
    def __enter__(self) -> "AttentionCapture":
        if self._active:
            raise UsageError("this AttentionCapture is already active")
        self._active = True
        try:
            self._install()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._teardown()

    def _teardown(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self._swin_inputs.clear()
        self._active = False

    def _install(self) -> None:
        self._handles.append(self.module.register_forward_pre_hook(self._on_root_forward, with_kwargs=True))
        self._handles.append(self.module.register_forward_hook(self._on_root_done))
        conv_seen: set[int] = set()
        drop_seen: dict[int, str] = {}
        for f in self._found:
            g = f.geometry
            if g is not None and g.conv is not None and id(g) not in conv_seen:
                conv_seen.add(id(g))
                self._handles.append(g.conv.register_forward_hook(self._make_grid_hook(g)))
            kind = f.layer.kind
            if kind == "hf_eager":
                continue  # after the loop: configs are shared
            if kind == "torch_mha":
                self._wrap_mha(f)
                continue
            for pre in f.pre_hooks:
                self._handles.append(f.module.register_forward_pre_hook(pre, with_kwargs=True))
            if kind in SOFTMAX_KINDS:
                self._wrap_softmax(f)
                continue
            # timm family: unfuse, tap attn_drop's input
            m = f.module
            drop = getattr(m, "attn_drop", None)
            if not isinstance(drop, nn.Module):
                raise UsageError(f"{f.layer.path}: no attn_drop module to tap")
            if id(drop) in drop_seen:
                raise UsageError(f"{f.layer.path} shares its attn_drop module with {drop_seen[id(drop)]}: "
                                 "repsim cannot tell their probabilities apart")
            drop_seen[id(drop)] = f.layer.path
            if isinstance(getattr(m, "fused_attn", None), bool):
                old = m.fused_attn
                m.fused_attn = False
                self._undo.append(lambda m=m, old=old: setattr(m, "fused_attn", old))
            self._handles.append(drop.register_forward_pre_hook(self._make_drop_hook(f)))
            if f.block is not None:
                self._handles.append(f.block.register_forward_pre_hook(self._make_block_hook(f.layer.path)))
        hf = [f for f in self._found if f.layer.kind == "hf_eager"]
        if hf:
            self._hf_eager(hf)
            for f in hf:
                self._handles.append(f.module.register_forward_hook(self._make_hf_hook(f)))
        if any(f.layer.kind == "torch_mha" for f in self._found):
            old_fast = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            self._undo.append(lambda: torch.backends.mha.set_fastpath_enabled(old_fast))

    def _hf_eager(self, hf: list[_Found]) -> None:
        pretrained = _hf_pretrained_type()
        assert pretrained is not None
        configs: dict[int, Any] = {}

        def collect(cfg: Any) -> None:
            if cfg is None or id(cfg) in configs or not hasattr(cfg, "_attn_implementation_internal"):
                return
            configs[id(cfg)] = cfg
            for key in getattr(cfg, "sub_configs", None) or {}:
                collect(getattr(cfg, key, None))

        roots = [m for m in self.module.modules() if isinstance(m, pretrained)]
        for pm in roots:
            collect(getattr(pm, "config", None))
        for f in hf:
            collect(getattr(f.module, "config", None))
        saved = [(cfg, cfg._attn_implementation_internal) for cfg in configs.values()]
        self._undo.append(lambda: [setattr(c, "_attn_implementation_internal", v) for c, v in saved])
        done: set[int] = set()
        for pm in roots:  # outermost first: set_attn_implementation dispatches to its sub-models
            if id(pm.config) in done:
                continue
            try:
                pm.set_attn_implementation("eager")
            except Exception:  # noqa: BLE001 - fall back to the config switch below
                pass
            done.update(id(m.config) for m in pm.modules() if isinstance(m, pretrained))
        for cfg in configs.values():  # attention modules whose config no model dispatched to
            if cfg._attn_implementation_internal != "eager":
                cfg._attn_implementation_internal = "eager"

    def _wrap_softmax(self, f: _Found) -> None:
        """Run the module's forward under a torch-function mode that keeps the output of its one softmax (LeViT,
        CaiT talking heads: no attn_drop after the softmax, so no module boundary to hook). The mode only
        observes: every call goes through unchanged."""
        m = f.module
        orig = m.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            tap = _SoftmaxTap()
            with tap:
                out = orig(*args, **kwargs)
            if len(tap.outputs) != 1:
                raise UsageError(f"{f.layer.path} ({f.layer.module_type}) computed {len(tap.outputs)} softmaxes, not "
                                 "one: repsim cannot tell which is its attention")
            self._emit(f, tap.outputs[0])
            return out

        self._patch_forward(m, forward)

    def _patch_forward(self, m: nn.Module, forward: Callable[..., Any]) -> None:
        """Replace ``m.forward`` by ``forward`` until the capture ends (an instance attribute set before is put
        back, otherwise the class's forward shows through again)."""
        had_instance = "forward" in m.__dict__
        orig = m.forward
        m.forward = forward  # type: ignore[method-assign]

        def undo() -> None:
            if had_instance:
                m.forward = orig  # type: ignore[method-assign]
            else:
                del m.forward

        self._undo.append(undo)

    def _wrap_mha(self, f: _Found) -> None:
        mha = f.module
        orig = mha.forward
        sig = inspect.signature(orig)
        if not {"need_weights", "average_attn_weights"} <= set(sig.parameters):
            raise UsageError(f"{f.layer.path} ({f.layer.module_type}) overrides forward without need_weights / "
                             "average_attn_weights: repsim cannot ask it for per-head weights")

        def forward(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            want, average = bound.arguments["need_weights"], bound.arguments["average_attn_weights"]
            bound.arguments["need_weights"] = True
            bound.arguments["average_attn_weights"] = False
            out, weights = orig(*bound.args, **bound.kwargs)
            probs = weights if weights.ndim == 4 else weights.unsqueeze(0)  # unbatched input: (H, L, S)
            self._emit(f, probs)
            if not want:
                return out, None
            return out, (weights.mean(dim=-3) if average else weights)

        self._patch_forward(mha, forward)

    # -- hooks ------------------------------------------------------------------------------------------
    def _on_root_forward(self, _mod: nn.Module, args: Any, kwargs: Any) -> None:
        self.num_forwards += 1
        self._calls.clear()
        for f in self._found:  # each forward reads its own grid off the patch convolution
            if f.geometry is not None:
                f.geometry.runtime_grid = None
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        self._batch = int(first.shape[0]) if first is not None and first.ndim >= 2 else None

    def _on_root_done(self, *_: Any) -> None:
        self._batch = None

    @staticmethod
    def _make_grid_hook(g: _Geometry):
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.ndim >= 3:
                g.runtime_grid = (int(out.shape[-2]), int(out.shape[-1]))

        return hook

    def _make_block_hook(self, path: str):
        def hook(block: nn.Module, args: Any) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.ndim == 4:  # timm Swin blocks take (B, H, W, C)
                self._swin_inputs[path] = (int(x.shape[1]), int(x.shape[2]))
            else:
                self._swin_inputs[path] = _pair(block.input_resolution)  # type: ignore[assignment]

        return hook

    def _make_drop_hook(self, f: _Found):
        def hook(_drop: nn.Module, args: Any) -> None:
            self._emit(f, args[0])

        return hook

    def _make_hf_hook(self, f: _Found):
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            weights = out[f.hf_index] if isinstance(out, (tuple, list)) and len(out) > f.hf_index else None
            if not isinstance(weights, torch.Tensor) or weights.ndim != 4:
                raise UsageError(f"{f.layer.path} ({f.layer.module_type}) returned no (B, heads, N, N) attention "
                                 "weights although its attention implementation was set to eager")
            self._emit(f, weights)

        return hook

    # -- records ----------------------------------------------------------------------------------------
    def _emit(self, f: _Found, probs: torch.Tensor) -> None:
        """Turn one attention call's probabilities into an :class:`AttentionRecord` (shapes checked against the
        layer's geometry), then keep it and / or pass it to the callback."""
        layer = f.layer
        probs = _detached_float32(probs)
        call = self._next_call(layer.path)
        forward = max(self.num_forwards - 1, 0)
        if layer.kind == "timm_like":
            _check_probabilities(layer, probs)
        if f.resolve is not None:
            rec = self._resolved_record(f, probs, forward, call)
        elif layer.windowed:
            rec = self._window_record(f, probs, forward, call)
        else:
            rec = self._global_record(f, probs, forward, call)
        self._deliver(rec)

    def _next_call(self, path: str) -> int:
        """Index of this call of layer ``path`` within the current forward pass (0, 1, … for a reused module)."""
        call = self._calls.get(path, 0)
        self._calls[path] = call + 1
        return call

    def _global_record(self, f: _Found, probs: torch.Tensor, forward: int, call: int) -> AttentionRecord:
        """A record of a global-attention layer, probs (B, heads, N, S); shape and batch checked, token layout
        (prefix, grid, patch size) read from the layer's geometry when the key count matches it, else None."""
        layer = f.layer
        self._check_global_shape(layer, probs)
        prefix, grid, patch = _global_layout(f, probs)
        if layer.class_query and grid is None:
            raise UsageError(f"{layer.path} ({layer.module_type}): class attention of shape {tuple(probs.shape)} "
                             "does not match one class-token query over the class token and the patch grid")
        return AttentionRecord(layer.path, layer.kind, probs, forward, call, prefix, grid, patch,
                               class_query=layer.class_query)

    def _check_global_shape(self, layer: AttentionLayer, probs: torch.Tensor) -> None:
        """Refuse global attention that is not (B, heads, N, S), or (but for torch MHA) attends over another
        number of sequences than the batch has images (windowed or grid attention)."""
        if probs.ndim != 4 or (layer.num_heads is not None and probs.shape[1] != layer.num_heads):
            raise UsageError(f"{layer.path} ({layer.module_type}) gave attention of shape {tuple(probs.shape)}, "
                             f"not (B, {layer.num_heads}, N, S)")
        if layer.kind != "torch_mha" and self._batch is not None and probs.shape[0] != self._batch:
            raise UsageError(f"{layer.path} ({layer.module_type}) attends over {probs.shape[0]} sequences for a "
                             f"batch of {self._batch} images (windowed or grid attention?); repsim captures "
                             "global attention and timm Swin windows only")

    def _deliver(self, rec: AttentionRecord) -> None:
        """Keep ``rec`` in :attr:`records` (on ``store_device``, or a clone on the model's device) when storing,
        and pass it, uncopied, to the callback."""
        if self.store:
            kept = rec.to(self.store_device) if self.store_device is not None else dataclasses.replace(
                rec, probs=rec.probs.clone())
            self.records[rec.path].append(kept)
        if self.callback is not None:
            self.callback(rec.path, rec)

    def _resolved_record(self, f: _Found, probs: torch.Tensor, forward: int, call: int) -> AttentionRecord:
        """A record of a family layer (LeViT, Twins) whose geometry its resolver gives; shapes checked."""
        layer = f.layer
        assert f.resolve is not None
        geo = f.resolve(probs)
        if geo.get("positions") is not None:  # windows: (B, nW, heads, w², w²), checked by the resolver
            if probs.ndim != 5 or (layer.num_heads is not None and probs.shape[2] != layer.num_heads):
                raise UsageError(f"{layer.path} ({layer.module_type}) gave window attention of shape "
                                 f"{tuple(probs.shape)}, not (B, windows, {layer.num_heads}, w², w²)")
        else:
            gh, gw = geo["grid"]
            p = int(geo["num_prefix_tokens"])
            qpos = geo.get("query_positions")
            n_q = p + (qpos.shape[0] if qpos is not None else gh * gw)
            if probs.ndim != 4 or (layer.num_heads is not None and probs.shape[1] != layer.num_heads) or \
                    tuple(probs.shape[-2:]) != (n_q, p + gh * gw):
                raise UsageError(f"{layer.path} ({layer.module_type}) gave attention of shape {tuple(probs.shape)}, "
                                 f"not (B, {layer.num_heads}, {n_q}, {p + gh * gw}) for its {gh}x{gw} key grid")
            if qpos is not None and qpos.device != probs.device:
                geo = dict(geo, query_positions=qpos.to(probs.device))
        return AttentionRecord(layer.path, layer.kind, probs, forward, call, **geo)

    def _window_record(self, f: _Found, probs: torch.Tensor, forward: int, call: int) -> AttentionRecord:
        layer, block = f.layer, f.block
        assert block is not None
        grid = self._swin_inputs.get(layer.path) or _pair(block.input_resolution)
        ws, ss = _pair(block.window_size), _pair(block.shift_size)
        assert grid is not None and ws is not None and ss is not None
        if not any(ss):
            ss = (0, 0)
        key = (grid, ws, ss, probs.device)
        if key not in self._swin_cache:
            self._swin_cache[key] = swin_window_positions(grid, ws, ss, probs.device)
        pos, padded = self._swin_cache[key]
        n_win, area = pos.shape[0], pos.shape[1]
        if probs.ndim != 4 or probs.shape[-1] != area or probs.shape[0] % n_win:
            raise UsageError(f"{layer.path}: window attention of shape {tuple(probs.shape)} does not match "
                             f"{n_win} windows of {ws[0]}x{ws[1]} on a {grid[0]}x{grid[1]} grid")
        probs = probs.view(probs.shape[0] // n_win, n_win, *probs.shape[1:])
        return AttentionRecord(layer.path, layer.kind, probs, forward, call, 0, grid, layer.patch_size,
                               positions=pos, padded=padded, window_size=ws, shift_size=ss)


class _SoftmaxTap(TorchFunctionMode):
    """Keeps the output of every softmax called while active (the handler runs with the mode disabled, so a
    softmax implemented through another torch function is seen once)."""

    _SOFTMAX = (torch.Tensor.softmax, torch.softmax, torch.nn.functional.softmax, torch.special.softmax)

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[torch.Tensor] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in self._SOFTMAX:
            self.outputs.append(out)
        return out


def no_attention_reason(module: nn.Module, name: str | None = None) -> str:
    """One line saying why ``module`` has no attention layer repsim can capture: the refused or unknown attention
    modules it has (e.g. XCiT's channel attention), or that it has none (a convolutional network or an MLP)."""
    found, unsupported = _discover(module)
    name = name or _model_name(module)
    if found:
        return f"{name} has {len(found)} capturable attention layers"
    if unsupported:
        return f"{name} has attention that repsim cannot capture: {'; '.join(unsupported[:3])}"
    return f"{name} has no attention layers (no module computes attention over tokens)"


def _detached_float32(probs: torch.Tensor) -> torch.Tensor:
    """``probs`` detached from the graph, as float32 (a copy only when it was another dtype)."""
    probs = probs.detach()
    if probs.dtype != torch.float32:
        probs = probs.float()
    return probs


def _global_layout(f: _Found, probs: torch.Tensor) -> tuple[int | None, Pair | None, Pair | None]:
    """``(num_prefix_tokens, grid, patch_size)`` of a global-attention call, probs (B, heads, N, S): the grid is the
    geometry's current grid when S = prefix + gh·gw and the queries are all tokens (or the one class token);
    otherwise prefix and grid are None. The patch size is the geometry's (None without one)."""
    g = f.geometry
    prefix = grid = None
    patch = g.patch_size if g is not None else None
    g_prefix = f.prefix if f.prefix is not None else (g.num_prefix_tokens if g is not None else None)
    if g is not None and g_prefix is not None:
        cur = g.current_grid()
        n_q = 1 if f.layer.class_query else probs.shape[-1]
        if cur is not None and probs.shape[-1] == g_prefix + cur[0] * cur[1] and probs.shape[-2] == n_q:
            prefix, grid = g_prefix, cur
    return prefix, grid, patch


def _check_probabilities(layer: AttentionLayer, probs: torch.Tensor) -> None:
    ok = probs.ndim == 4 and (layer.num_heads is None or probs.shape[1] == layer.num_heads)
    if ok and probs.numel():
        ok = bool(probs.min() >= 0) and bool(((probs.sum(-1) - 1).abs().max() < 1e-3))
    if not ok:
        raise UsageError(f"{layer.path} ({layer.module_type}): the tensor given to attn_drop (shape "
                         f"{tuple(probs.shape)}) is not a (B, {layer.num_heads}, N, S) probability map; repsim "
                         "cannot capture this attention")


def _model_name(module: nn.Module) -> str:
    inner = getattr(module, "model", None)  # hooks.models.hf_loader.HFImageModel
    pretrained = _hf_pretrained_type()
    target = inner if pretrained is not None and isinstance(inner, pretrained) else module
    cfg = getattr(target, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return type(target).__name__


__all__ = ["AttentionCapture", "AttentionLayer", "AttentionRecord", "CLASS_KINDS", "CROSS_GRID_KINDS", "KINDS",
           "SOFTMAX_KINDS", "WINDOW_KINDS", "find_attention_layers", "no_attention_reason", "swin_window_positions"]
