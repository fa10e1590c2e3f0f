"""Online reduction of captured attention probabilities to the per-image statistics a store keeps.

Full attention maps cost about 11 MB per image for ViT-B/16 (12 layers × 12 heads × 197²), so extraction
never keeps them all: each batch's probabilities (from :class:`hooks.capture.attention.AttentionCapture`) are
reduced at once, in float32, to per image × head statistics (mean attention distance in pixels, prefix
mass, entropy; :func:`repsim.attention.statistics.head_statistics`) and to per-chunk sums of the aligned attention maps
(Walmer et al. 2023). Per image × head, global-attention layers also keep the *query map* (the CLS query's
attention over the patch keys, or the mean patch query's without a prefix token;
:func:`repsim.attention.segmentation.query_maps`) for attention-as-segmentation. The full maps of the first
``attn_keep`` images of global-attention layers are kept (float16) for attention rollout and figures. The
arrays and their layout are specified in :mod:`repsim.store` ("Attention").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hooks.capture.attention import AttentionLayer, AttentionRecord
from repsim.attention.statistics import class_attention_statistics, head_statistics
from repsim.attention.segmentation import query_map_kind, query_maps
from repsim.errors import UsageError
from repsim.store.writer import ArraySpec

STATS = ("distance", "prefix_mass", "entropy")
CLASS_STATS = ("prefix_mass", "entropy")


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _px(value: Any) -> list[float | int]:
    """A token stride in pixels: ints when whole (CrossViT's resized branch has 17.14 px)."""
    v = value if isinstance(value, (tuple, list)) else (value, value)
    return [int(round(x)) if abs(float(x) - round(float(x))) < 1e-9 else float(x) for x in v[:2]]


def layer_attrs(layer: AttentionLayer) -> dict[str, Any]:
    """JSON-able geometry of one attention layer, as recorded in the store's ``attention.info``: ``grid`` and
    ``patch_size`` are the keys' (and the aligned canvas'); ``query_grid`` / ``query_patch_size`` the queries'
    when they differ (LeViT subsampling, Twins global sub-sampled attention), else null; ``class_query`` true
    for class attention (stored as CLS-to-patch maps)."""
    qg = getattr(layer, "query_grid", None)
    qp = getattr(layer, "query_patch_size", None)
    return {
        "kind": layer.kind,
        "num_heads": int(layer.num_heads),
        "num_prefix_tokens": int(layer.num_prefix_tokens),
        "grid": list(_pair(layer.grid)),
        "patch_size": _px(layer.patch_size),
        "window_size": None if getattr(layer, "window_size", None) is None else list(_pair(layer.window_size)),
        "shift_size": None if getattr(layer, "shift_size", None) is None else list(_pair(layer.shift_size)),
        "query_grid": None if qg is None else list(_pair(qg)),
        "query_patch_size": None if qp is None else _px(qp),
        "class_query": bool(getattr(layer, "class_query", False)),
    }


def is_windowed(layer: AttentionLayer) -> bool:
    return getattr(layer, "window_size", None) is not None


def is_class_query(layer: AttentionLayer) -> bool:
    return bool(getattr(layer, "class_query", False))


def _n_queries(layer: AttentionLayer) -> int:
    """Query rows of a global-attention layer: prefix tokens + patch queries (the query grid when it differs)."""
    gh, gw = _pair(layer.query_grid if getattr(layer, "query_grid", None) is not None else layer.grid)
    return int(layer.num_prefix_tokens) + gh * gw


class AttentionReducer:
    """Collects the attention statistics of one sample chunk at a time.

    Use as the ``callback`` of an ``AttentionCapture``; call :meth:`begin_batch` with the batch's store
    rows before each forward pass and :meth:`pop_chunk` once a chunk's last batch has run.
    """

    def __init__(self, layers: list[AttentionLayer], attn_keep: int = 0):
        if attn_keep < 0:
            raise UsageError(f"--attn-keep must be >= 0, got {attn_keep}")
        self.layers = {layer.path: layer for layer in layers}
        self.attn_keep = int(attn_keep)
        self._rows: range | None = None
        self._parts: dict[str, list[np.ndarray]] = {}
        self._aligned: dict[str, np.ndarray] = {}
        self._seen: dict[str, int] = {}

    # -- layout ---------------------------------------------------------------------------------------------
    def keeps_maps(self, layer: AttentionLayer) -> bool:
        return self.attn_keep > 0 and not is_windowed(layer) and not is_class_query(layer)

    @staticmethod
    def keeps_query_map(layer: AttentionLayer) -> bool:
        """Global self-attention only: a windowed layer (Swin, Twins local) has no query that sees the whole
        image, and class-attention layers keep their CLS-to-patch sums in ``cls_map``."""
        return not is_windowed(layer) and not is_class_query(layer)

    def specs(self) -> list[ArraySpec]:
        """The extra store arrays (see :mod:`repsim.store`, "Attention"). A class-attention layer (CaiT,
        CrossViT) has ``prefix_mass`` and ``entropy`` of its class-token row and, instead of a distance and an
        aligned map (its query has no position), ``cls_map`` (n_chunks, heads, gh, gw): per-chunk sums of the
        CLS-to-patch map renormalised over the patch keys (:func:`repsim.attention.statistics.class_attention_statistics`)."""
        out = []
        for path, layer in self.layers.items():
            gh, gw = _pair(layer.grid)
            heads = int(layer.num_heads)
            if is_class_query(layer):
                for stat in CLASS_STATS:
                    out.append(ArraySpec(f"attn/{path}/{stat}", (heads,), "float32"))
                out.append(ArraySpec(f"attn/{path}/cls_map", (heads, gh, gw), "float32", rows="chunks"))
                continue
            for stat in STATS:
                out.append(ArraySpec(f"attn/{path}/{stat}", (heads,), "float32"))
            out.append(ArraySpec(f"attn/{path}/aligned", (heads, 2 * gh - 1, 2 * gw - 1), "float32", rows="chunks"))
            if self.keeps_query_map(layer):
                # float32: 4·heads·gh·gw bytes per image (113 KB for ViT-B/16's 12 layers, 3% of its float16
                # tokens) and no float16 underflow of the small weights that the mass rule sums up
                out.append(ArraySpec(f"attn/{path}/query_map", (heads, gh * gw), "float32"))
            if self.keeps_maps(layer):
                n_k = int(layer.num_prefix_tokens) + gh * gw
                out.append(ArraySpec(f"attn/{path}/maps", (heads, _n_queries(layer), n_k), "float16", rows="first",
                                     first_rows=self.attn_keep))
        return out

    def attrs(self) -> dict[str, Any]:
        """The root attribute ``attention``: ``layers`` (those with per-patch-query statistics, what
        ``repsim attention`` reports), ``class_layers`` (class attention: CLS-to-patch maps), ``info`` of all."""
        info = {path: layer_attrs(layer) for path, layer in self.layers.items()}
        for path, layer in self.layers.items():
            # which query the stored query map is: "cls" (the first prefix token) or "mean" (of the patch queries)
            info[path]["query_map"] = (query_map_kind(int(layer.num_prefix_tokens), layer.class_token)
                                       if self.keeps_query_map(layer) else None)
        return {
            "layers": [p for p, ly in self.layers.items() if not is_class_query(ly)],
            "class_layers": [p for p, ly in self.layers.items() if is_class_query(ly)],
            "attn_keep": self.attn_keep,
            "info": info,
        }

    def bytes_per_image(self) -> int:
        total = 0
        for layer in self.layers.values():
            total += 3 * 4 * int(layer.num_heads)
            if self.keeps_query_map(layer):
                gh, gw = _pair(layer.grid)
                total += 4 * int(layer.num_heads) * gh * gw
        return total

    # -- online reduction -----------------------------------------------------------------------------------
    def begin_batch(self, rows: range) -> None:
        """The store rows of the next forward pass (needed to keep the maps of the first images)."""
        self._rows = rows
        self._seen = {}

    def __call__(self, path: str, record: AttentionRecord) -> None:
        layer = self.layers.get(path)
        if layer is None:
            return
        if self._rows is None:
            raise RuntimeError("AttentionReducer.begin_batch was not called")
        if self._seen.get(path):
            raise UsageError(f"attention layer {path} ran twice in one forward pass: not supported")
        self._seen[path] = 1
        probs = record.probs
        grid, patch = _pair(layer.grid), tuple(_px(layer.patch_size))
        if record.grid is not None and tuple(record.grid) != grid:
            raise UsageError(f"attention layer {path} ran on a {record.grid[0]}x{record.grid[1]} grid, not the "
                             f"{grid[0]}x{grid[1]} it was set up for")
        with torch.no_grad():
            if is_class_query(layer):
                cstats = class_attention_statistics(probs, grid, int(layer.num_prefix_tokens))
                for stat in CLASS_STATS:
                    self._parts.setdefault(f"attn/{path}/{stat}", []).append(cstats[stat].float().cpu().numpy())
                key = f"attn/{path}/cls_map"
                self._aligned[key] = self._aligned.get(key, 0) + cstats["cls_map"].sum(0).float().cpu().numpy()
                return
            if record.positions is None:
                stats = head_statistics(probs, grid, patch, int(layer.num_prefix_tokens),
                                        query_positions=record.query_positions)
                for stat in STATS:
                    self._parts.setdefault(f"attn/{path}/{stat}", []).append(stats[stat].float().cpu().numpy())
                aligned = stats["aligned_sum"].float().cpu().numpy()
                if self.keeps_query_map(layer):
                    qmap = query_maps(probs, grid, int(layer.num_prefix_tokens), layer.class_token)
                    self._parts.setdefault(f"attn/{path}/query_map", []).append(qmap.float().cpu().numpy())
                if self.keeps_maps(layer) and self._rows.start < self.attn_keep:
                    keep = min(len(self._rows), self.attn_keep - self._rows.start)
                    maps = probs[:keep].to(torch.float16).cpu().numpy()
                    self._parts.setdefault(f"attn/{path}/maps", []).append(maps)
            else:
                aligned = self._windowed(path, layer, record, grid, patch)
        key = f"attn/{path}/aligned"
        self._aligned[key] = self._aligned.get(key, 0) + aligned

    def _windowed(self, path: str, layer: AttentionLayer, record: AttentionRecord, grid, patch) -> np.ndarray:
        """Swin: probabilities (B, nW, H, w², w²) with each window token's image position (nW, w², 2).

        Per-image statistics are means over the windows (every window has w² queries)."""
        if record.padded is not None and bool(record.padded.any()):
            # padded tokens have no image position; dropping them would bias the per-query means
            raise UsageError(f"{path}: the stage grid {tuple(grid)} is not a multiple of the window "
                             f"{layer.window_size}, so timm pads windows; choose --img-size so that it is")
        pos = record.positions[:, None]  # (nW, 1, w², 2): broadcast over heads
        stats = head_statistics(record.probs, grid, patch, 0, positions=pos)
        for stat in STATS:
            self._parts.setdefault(f"attn/{path}/{stat}", []).append(stats[stat].mean(1).float().cpu().numpy())
        return stats["aligned_sum"].sum(0).float().cpu().numpy()

    def pop_chunk(self) -> dict[str, np.ndarray]:
        """The finished chunk's arrays for :meth:`repsim.store.writer.StoreWriter.write_chunk` (``extra=``)."""
        out: dict[str, np.ndarray] = {k: np.concatenate(v) for k, v in self._parts.items()}
        out.update({k: np.asarray(v, dtype=np.float32) for k, v in self._aligned.items()})
        for path, layer in self.layers.items():
            stats = CLASS_STATS if is_class_query(layer) else STATS + (("query_map",) if self.keeps_query_map(layer)
                                                                        else ())
            for stat in stats:
                if f"attn/{path}/{stat}" not in out:
                    raise UsageError(f"attention layer {path} did not run during the forward pass")
            if self.keeps_maps(layer) and f"attn/{path}/maps" not in out:
                # chunk past the kept images: the writer ignores these rows
                gh, gw = _pair(layer.grid)
                n_k = int(layer.num_prefix_tokens) + gh * gw
                out[f"attn/{path}/maps"] = np.zeros((0, int(layer.num_heads), _n_queries(layer), n_k), np.float16)
        self._parts, self._aligned = {}, {}
        return out
