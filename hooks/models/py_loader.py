"""The ``py:<file.py>:<factory>`` loader: a model built by the user's own Python function.

The file's bytes are hashed before anything runs; a store rebuild passes the recorded sha256 (the trust-code
gate is :func:`hooks.models.registry.check_rebuild_allowed`), and a file that changed is refused before it is
imported.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import os
import sys
import warnings
from typing import Any

from torch import nn

from hooks.capture.layers import infer_family
from hooks.models.loaded import ModelInfo, _check_patch_multiple, _read_geometry
from hooks.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, default_preprocessing
from hooks.models.weights import apply_state_dict, load_state_dict_file
from repsim.errors import UsageError


def _load_py(name: str, ident: str, weights: str | None, random_init: bool, img_size: int | None,
             code_sha256: str | None = None, **_hub: Any) -> tuple[nn.Module, ModelInfo, Preprocessing]:
    file, _, factory_name = ident.rpartition(":")
    path = os.path.abspath(os.path.expanduser(file))
    if not os.path.isfile(path):
        raise UsageError(f"py: model file not found: {file}")
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as err:
        raise UsageError(f"cannot read {file}: {err.strerror or err}") from None
    digest = hashlib.sha256(source).hexdigest()
    if code_sha256 is not None and digest != code_sha256:
        # checked on the bytes that would run, before anything is imported
        raise UsageError(f"{file} changed since the extraction (sha256 {digest[:12]}..., recorded "
                         f"{code_sha256[:12]}...): refusing to import it; the model cannot be rebuilt")
    mod_name = f"repsim_user_model_{digest[:16]}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {file} as a Python module")
    user = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = user  # so classes defined there pickle (data-loader workers)
    try:
        exec(compile(source, path, "exec"), user.__dict__)  # noqa: S102 - the hashed bytes, not a re-read file
    except Exception as err:  # noqa: BLE001 - the user's code: report it as their input error, keep the chain
        sys.modules.pop(mod_name, None)
        raise UsageError(f"importing {file} failed: {type(err).__name__}: {err}") from err
    factory = getattr(user, factory_name, None)
    if not callable(factory):
        options = [n for n, v in vars(user).items() if callable(v) and not n.startswith("_")
                   and getattr(v, "__module__", None) == mod_name]
        close = difflib.get_close_matches(factory_name, options, n=3, cutoff=0.5)
        if close:
            hint = f"; did you mean {', '.join(close)}?"
        else:
            hint = f"; it defines {', '.join(options[:8])}" if options else ""
        raise UsageError(f"{file} has no function {factory_name!r}{hint}")
    params = inspect.signature(factory).parameters
    kwargs: dict[str, Any] = {}
    if random_init and "pretrained" in params:
        kwargs["pretrained"] = False
    if img_size is not None and "img_size" in params:
        kwargs["img_size"] = img_size
    try:
        module = factory(**kwargs)
    except Exception as err:  # noqa: BLE001 - the user's code
        raise UsageError(f"{file}:{factory_name}() failed: {type(err).__name__}: {err}") from err
    if not isinstance(module, nn.Module):
        raise UsageError(f"{file}:{factory_name}() returned a {type(module).__name__}, not a torch.nn.Module")
    if weights:
        sd, wdigest = load_state_dict_file(weights)
        record: dict[str, Any] = apply_state_dict(module, sd, weights, wdigest)
    elif random_init and "pretrained" in params:
        record = {"kind": "random"}
    else:
        if random_init:
            warnings.warn(f"{factory_name}() takes no `pretrained` argument: its weights are whatever it makes",
                          stacklevel=3)
        record = {"kind": "factory", "factory": f"{path}:{factory_name}", "sha256": digest}
    module.eval()
    cfg = getattr(module, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        prep = Preprocessing(tuple(cfg["input_size"][1:]), cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD),
                             cfg.get("interpolation", "bicubic") if cfg.get("interpolation") in
                             ("bicubic", "bilinear", "nearest") else "bicubic",
                             cfg.get("crop_pct") or 0.875, cfg.get("crop_mode") or "center")
    else:
        prep = default_preprocessing(224)
    if img_size is not None:
        prep = prep.with_overrides(img_size=img_size)
    prefix, patch, grid = _read_geometry(module)
    if grid is not None and patch is not None:
        _check_patch_multiple(prep.img_size, patch, f"{file}:{factory_name}")
        if (grid[0] * patch[0], grid[1] * patch[1]) != prep.img_size:
            raise UsageError(f"{file}:{factory_name}() builds a {grid[0]}x{grid[1]} patch grid "
                             f"({grid[0] * patch[0]} px) but the input is {prep.img_size[0]} px; "
                             "give the factory an img_size parameter or pass the matching --img-size")
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    num_classes = int(getattr(module, "num_classes", 0) or (linears[-1].out_features if linears else 0))
    info = ModelInfo(
        name=name, source="py", source_id=f"{file}:{factory_name}", family=infer_family(module), weights=record,
        num_prefix_tokens=prefix, patch_size=patch, grid=grid, num_classes=num_classes, code_sha256=digest,
    )
    return module, info, prep
