"""Forward-hook capture of per-layer activations.

:class:`ActivationCapture` registers a forward hook on each requested module and turns every call's output
into one float32 tensor per *tap*, pooled as asked. It handles the traps that make naive hook code return
wrong activations:

- a module called several times per forward (weight sharing, recurrent blocks): every call is recorded, as
  ``<path>@<call index>``; a module called once keeps its plain path;
- in-place operations after the tap (``x += ...`` in the next block, ``ReLU(inplace=True)``): the captured
  tensor is a copy, never a view of the live output;
- tuple / list / dict / ``ModelOutput`` / dataclass outputs (Hugging Face blocks return tuples): the first
  tensor (or ``last_hidden_state`` / ``logits``) is taken, and which one is recorded;
- channels-last outputs (timm Swin stages give (B, H, W, C)): permuted to (B, C, H, W);
- prefix tokens (CLS, registers, distillation): the count comes from the model, never from sqrt(N - 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from repsim.errors import UsageError

POOL_MODES = ("none", "mean", "cls", "gap")


def select_tensor(output: Any) -> tuple[torch.Tensor, str]:
    """The tensor to record from a module output, and a description of where it came from."""
    if isinstance(output, torch.Tensor):
        return output, "output"
    if isinstance(output, Mapping) or hasattr(output, "keys"):
        for key in ("last_hidden_state", "logits", "hidden_states"):
            value = output.get(key) if hasattr(output, "get") else None
            if isinstance(value, torch.Tensor):
                return value, f"output[{key!r}]"
        for key in output.keys():
            if isinstance(output[key], torch.Tensor):
                return output[key], f"output[{key!r}]"
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        for f in dataclasses.fields(output):
            value = getattr(output, f.name)
            if isinstance(value, torch.Tensor):
                return value, f"output.{f.name}"
    if isinstance(output, (tuple, list)):
        for i, value in enumerate(output):
            if isinstance(value, torch.Tensor):
                return value, f"output[{i}]"
    raise UsageError(f"cannot capture a module output of type {type(output).__name__}: it holds no tensor")


@dataclasses.dataclass
class TapInfo:
    """How one captured layer looks once pooled (per sample)."""

    name: str
    module: str
    call_index: int | None
    tap: str
    kind: str  # tokens | map | vector
    shape: tuple[int, ...]
    layout_in: str
    pool: str
    num_prefix_tokens: int | None = None
    grid: tuple[int, int] | None = None

    def attrs(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("name")
        d["shape"] = list(self.shape)
        d["grid"] = list(self.grid) if self.grid else None
        return d


class ActivationCapture:
    """Context manager that records the outputs of ``layers`` of ``module`` during forward passes.

    Parameters
    ----------
    module : the model
    layers : module paths (``named_modules`` names) in network order
    layouts : per path, "nhwc" when the module emits channels-last maps, else "auto"
    num_prefix_tokens, grid : the model's prefix-token count and patch grid (gh, gw); a token output with
        ``num_prefix_tokens + gh * gw`` tokens carries the prefix, one with ``gh * gw`` tokens does not
    pool : "none" keeps tokens / maps as they are; "mean" (alias "gap") averages the patch tokens (prefix
        excluded) or the H × W positions of a map into a vector; "cls" keeps token 0 of token outputs that
        carry prefix tokens and mean-pools every other layer (recorded per layer)
    spatial_pool : K → average-pool maps (and token outputs with a known grid, prefix kept) to K × K
    dtype : dtype of the recorded tensors (float32 by default), or one per path. Extraction passes the stored
        dtype of each layer, so each
        output is pooled in float32 and then cast once, on the model's device, into a new tensor (the copy
        that protects against later in-place operations is the cast itself: no second pass, half the bytes
        to move off a GPU). Non-finite values (and float16 overflow, which casts to ±inf) are left for the
        caller to refuse (:func:`finite_or_raise`).

    After a forward pass, :meth:`pop` returns ``{tap name: tensor (B, ...)}`` of ``dtype`` on the CPU.
    :attr:`quant_error` holds, for taps measured with :meth:`measure_next`, the float16 error statistics of
    :func:`fp16_error_stats`.
    """

    def __init__(
        self,
        module: nn.Module,
        layers: Sequence[str],
        *,
        layouts: Mapping[str, str] | None = None,
        num_prefix_tokens: int = 0,
        grid: tuple[int, int] | None = None,
        pool: str = "none",
        spatial_pool: int | None = None,
        dtype: torch.dtype | Mapping[str, torch.dtype] = torch.float32,
    ):
        if pool not in POOL_MODES:
            raise UsageError(f"--pool must be one of {', '.join(POOL_MODES)}, got {pool!r}")
        if spatial_pool is not None and spatial_pool < 1:
            raise UsageError(f"--spatial-pool must be >= 1, got {spatial_pool}")
        modules = dict(module.named_modules())
        missing = [p for p in layers if p not in modules]
        if missing:
            raise UsageError(f"no module named {missing[0]!r} in the model (see `repsim layers`)")
        self.module = module
        self.paths = list(layers)
        self.layouts = dict(layouts or {})
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.grid = tuple(grid) if grid else None
        self.pool = "mean" if pool == "gap" else pool
        self.spatial_pool = spatial_pool
        self.dtypes = {p: (dtype.get(p, torch.float32) if isinstance(dtype, Mapping) else dtype) for p in self.paths}
        self._measure_rows = 0  # > 0: the next forward also measures float16 error on its first rows
        self.quant_error: dict[str, list[tuple[float, float]]] = {p: [] for p in self.paths}
        self._targets = {p: modules[p] for p in self.paths}
        self._handles: list[Any] = []
        # per path, one (pooled tensor, tap, raw rank, raw token count) per call of the module
        self._records: dict[str, list[tuple[torch.Tensor, str, int, int | None]]] = {p: [] for p in self.paths}
        self.taps: list[TapInfo] | None = None  # known after the first forward

    # -- hook plumbing ----------------------------------------------------------------------------------
    def __enter__(self) -> "ActivationCapture":
        for path, mod in self._targets.items():
            self._handles.append(mod.register_forward_hook(self._make_hook(path)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for rec in self._records.values():
            rec.clear()

    def _make_hook(self, path: str):
        def hook(_mod: nn.Module, _inp: Any, output: Any) -> None:
            tensor, tap = select_tensor(output)
            raw_tokens = tensor.shape[1] if tensor.ndim == 3 else None
            # Reduce right away into a new tensor (pooled, or a cast copy), so later in-place ops cannot touch it.
            reduced = self._reduce(path, tensor.detach())
            if self._measure_rows:
                self.quant_error[path].append(fp16_error_stats(reduced[: self._measure_rows]))
            self._records[path].append((self._finish(reduced, self.dtypes[path]), tap, tensor.ndim, raw_tokens))

        return hook

    # -- shaping ----------------------------------------------------------------------------------------
    def _token_layout(self, n_tokens: int) -> tuple[int | None, tuple[int, int] | None]:
        """(prefix count, grid) for a token output of ``n_tokens`` tokens, or (None, None) when unknown."""
        if self.grid is not None:
            g = self.grid[0] * self.grid[1]
            if n_tokens == self.num_prefix_tokens + g:
                return self.num_prefix_tokens, self.grid
            if n_tokens == g:
                return 0, self.grid
        if self.num_prefix_tokens == 0 and self.grid is None:
            return 0, None
        return None, None

    def measure_next(self, rows: int) -> None:
        """Measure the float16 error of the next forward pass on its first ``rows`` samples (0: stop)."""
        self._measure_rows = int(rows)

    @staticmethod
    def _finish(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A new contiguous CPU tensor of ``dtype`` holding ``x`` (cast on x's device first)."""
        if x.dtype != dtype:
            return x.to(dtype=dtype, memory_format=torch.contiguous_format).cpu()  # the cast is the copy
        if x.is_cpu:
            return x.clone(memory_format=torch.contiguous_format)
        return x.contiguous().cpu()

    def _reduce(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """Pool / reshape one output in float32 on its device; the result may share memory with ``x``."""
        x = x.float()
        if x.ndim == 4 and self.layouts.get(path) == "nhwc":
            x = x.permute(0, 3, 1, 2)
        if x.ndim == 4:  # map (B, C, H, W)
            if self.pool in ("mean", "cls"):
                return x.mean(dim=(2, 3))
            if self.spatial_pool:
                x = F.adaptive_avg_pool2d(x, self.spatial_pool)
            return x
        if x.ndim == 3:  # tokens (B, T, D)
            prefix, grid = self._token_layout(x.shape[1])
            if self.pool == "cls" and prefix:
                return x[:, 0]
            if self.pool in ("mean", "cls"):
                return x[:, prefix or 0 :].mean(dim=1)
            if self.spatial_pool and grid is not None:
                p = prefix or 0
                patches = x[:, p:].transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
                pooled = F.adaptive_avg_pool2d(patches, self.spatial_pool).flatten(2).transpose(1, 2)
                x = torch.cat([x[:, :p], pooled], dim=1)
            return x
        if x.ndim == 2:
            return x
        raise UsageError(
            f"layer {path!r} outputs a {x.ndim}-d tensor of shape {tuple(x.shape)}; repsim stores "
            "vectors (B, D), tokens (B, T, D) and maps (B, C, H, W)"
        )

    def _describe(self, path: str, call: int | None, tensor: torch.Tensor, raw_ndim: int, tap: str, raw_tokens: int | None) -> TapInfo:
        shape = tuple(tensor.shape[1:])
        kind = {1: "vector", 2: "tokens", 3: "map"}[len(shape)]
        name = path if call is None else f"{path}@{call}"
        pool = "none"
        if raw_ndim != tensor.ndim:
            pool = "cls" if (self.pool == "cls" and raw_ndim == 3 and self._token_layout(raw_tokens or 0)[0]) else "mean"
        elif self.spatial_pool and raw_ndim >= 3 and kind != "vector":
            pool = f"spatial{self.spatial_pool}"
        info = TapInfo(name, path, call, tap, kind, shape, self.layouts.get(path, "auto"), pool)
        if kind == "tokens":
            prefix, grid = self._token_layout(raw_tokens or 0)
            if pool.startswith("spatial") and grid is not None:
                grid = (self.spatial_pool, self.spatial_pool)
            info.num_prefix_tokens, info.grid = prefix, grid
        elif kind == "map":
            info.grid = (shape[1], shape[2])
        return info

    # -- results ----------------------------------------------------------------------------------------
    def pop(self) -> dict[str, torch.Tensor]:
        """Activations of the last forward pass, ``{tap name: float32 (B, ...)}``, in network order.

        The first call fixes :attr:`taps` (names, kinds, shapes); later passes must call every module the
        same number of times.
        """
        out: dict[str, torch.Tensor] = {}
        for path in self.paths:
            rec = self._records[path]
            if not rec:
                raise UsageError(f"layer {path!r} was never called during the forward pass")
            if len(rec) == 1:
                out[path] = rec[0][0]
            else:
                for i, (t, *_) in enumerate(rec):
                    out[f"{path}@{i}"] = t
        if self.taps is None:
            self.taps = [
                self._describe(path, None if len(self._records[path]) == 1 else i, t, raw_ndim, tap, raw_tokens)
                for path in self.paths
                for i, (t, tap, raw_ndim, raw_tokens) in enumerate(self._records[path])
            ]
        elif [t.name for t in self.taps] != list(out):
            raise UsageError("the model called its modules a different number of times than in the first batch")
        for rec in self._records.values():
            rec.clear()
        self._measure_rows = 0
        return out

FP16_MAX = 65504.0


def finite_or_raise(name: str, x: torch.Tensor, dtype: str) -> None:
    """Refuse NaN / Inf in a captured tensor ``x`` (already cast to the stored ``dtype``).

    One read-only pass: the sum of finite values is finite (float16 is summed in float32), and any NaN or
    Inf makes it non-finite. A float16 capture holds ±inf exactly where the model's value overflowed float16
    (|v| > 65504) or was itself infinite; the slow path after a failure tells the two cases apart only as
    far as the float16 tensor can (NaN vs inf).
    """
    if x.numel() == 0:
        return
    # float16 sums in float32 (65504 · 2^24 elements stay far below float32's range); float32 in its own dtype,
    # which can overflow for huge finite values: then the exact elementwise check decides.
    total = x.sum(dtype=torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x.sum()
    if bool(torch.isfinite(total)) or bool(torch.isfinite(x).all()):
        return
    if bool(torch.isnan(x).any()):
        raise UsageError(f"layer {name!r} produced NaN activations")
    if dtype == "float16":
        raise UsageError(
            f"layer {name!r} has activations beyond float16's range (|v| > {FP16_MAX:g}) or infinite: "
            "extract with --dtype float32"
        )
    raise UsageError(f"layer {name!r} produced Inf activations")


def fp16_error_stats(x: torch.Tensor) -> tuple[float, float]:
    """Float16 storage error of float32 activations ``x`` (rows, ...): ``(Σ (fp16(x) − x)², Σ (x − x̄)²)``.

    ``x̄`` is the per-feature mean over the rows; sums in float64. Their ratio η is the share of the
    layer's variation (about its mean, what CKA and probes see) that float16 rounding replaces by noise:
    about 2e-8 for well-scaled features (relative rounding 2^-11 / √12), near 1 where a large per-feature
    offset (massive activations) or values below float16's subnormal range (6e-8, underflow to 0) swamp
    the variation. Values that overflow float16 give inf.
    """
    x = x.reshape(x.shape[0], -1).float()
    if x.shape[0] < 2:
        return 0.0, 0.0
    err = float((x.half().float() - x).double().pow(2).sum())
    spread = float((x - x.mean(dim=0)).double().pow(2).sum())
    return err, spread



def probe_output_shapes(module: nn.Module, x: torch.Tensor) -> list[tuple[str, str, tuple[int, ...] | None, int]]:
    """Run one forward pass with a hook on every module: ``[(path, type name, output shape, calls)]``.

    The shape is that of the tensor :func:`select_tensor` would capture (None when the output holds no
    tensor); rows are in registration order, the root module excluded.
    """
    seen: dict[str, list[Any]] = {}
    handles = []
    named = [(p, m) for p, m in module.named_modules() if p]

    def make(path: str):
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            rec = seen.setdefault(path, [None, 0])
            rec[1] += 1
            if rec[0] is None:
                try:
                    rec[0] = tuple(select_tensor(out)[0].shape)
                except UsageError:
                    pass

        return hook

    for path, mod in named:
        handles.append(mod.register_forward_hook(make(path)))
    try:
        with torch.inference_mode():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return [(p, type(m).__name__, seen.get(p, [None, 0])[0], seen.get(p, [None, 0])[1]) for p, m in named]
