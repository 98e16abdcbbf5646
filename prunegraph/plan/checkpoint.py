"""Saving and reloading pruned models with per-layer shapes and no hand-written model code.

A pruned folder holds::

    model.safetensors                 the pruned weights (tied parameters stored once)
    prunegraph_buffers.safetensors    non-persistent buffers (RoPE tables ...), so nothing is
                                      re-derived from code on load
    config.json                       the HF config of the saved weights, in the dtype they have:
                                      for a uniform plan the pruned widths (plain
                                      AutoModelForCausalLM.from_pretrained loads it); otherwise
                                      the base widths with transformers' ``per_layer_config``
                                      overrides where its config class accepts them; always a
                                      ``prunegraph`` section (per-layer widths, the plan's hash,
                                      how to load). Never the GGUF ``quantization_config``.
    prunegraph_plan.json/.safetensors the plan, the base config and the tied names
    README.md                         the model card (base model, method, widths, loading)
    tokenizer files, generation_config.json when given / present

:func:`from_pretrained` builds the *base* architecture from the stored base config on the ``meta``
device, applies the plan structurally with the same slicing code as the pruning run (so any
per-layer widths work), loads the tensors with ``assign=True``, re-ties shared parameters and
returns the model in eval mode. The folder is built under a temporary name and renamed, so a
failed save leaves nothing behind.

A model that carries a method runtime (PrunePath's routers) saves the same way through a
registered :class:`~prunegraph.plan.extensions.CheckpointExtension`: its parameters are stored
with the others, and the plan's JSON records, under the extension's name, the spec that
:func:`from_pretrained` rebuilds the runtime from before loading the tensors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Set
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunegraph.atomic import atomic_dir
from prunegraph.errors import (
    CheckpointError,
    PlanError,
    PreconditionError,
    PrunegraphError,
)
from prunegraph.ir.capture import tied_names
from prunegraph.plan.extensions import registered_extensions
from prunegraph.plan.plan import Plan
from prunegraph.plan.slicing import apply_plan, config_updates, grouped_mm_aligned

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["save_pruned", "from_pretrained", "saved_plan", "without_source_quantizer", "WEIGHTS",
           "BUFFERS", "PLAN_STEM"]

WEIGHTS = "model.safetensors"
BUFFERS = "prunegraph_buffers.safetensors"
PLAN_STEM = "prunegraph_plan"
#: Keys of the plan's extra JSON that the core itself writes (others name extensions).
_PLAN_EXTRA_KEYS = frozenset({"base_config", "model_class", "tied", "hf_compatible"})
_FIX = ("copy the whole folder again from where it was saved, or re-run the pipeline that made "
        "it")
#: Config keys that describe how the source weights were stored, not the saved ones.
_SOURCE_ONLY = ("quantization_config",)


@contextlib.contextmanager
def without_source_quantizer(model: nn.Module) -> Iterator[None]:
    """Inside the block, ``model`` forgets the GGUF file it was loaded from.

    transformers dequantises a ``.gguf`` file into plain float tensors but keeps its GGUF
    quantizer on the model and its ``quantization_config`` on the config, and then refuses
    ``save_pretrained`` ("quantized with gguf and is not serializable") although nothing in the
    model is quantized any more. Saving inside this block writes the plain weights and a config
    without ``quantization_config``, so the folder loads with plain ``from_pretrained``. A model
    with any non-float parameter (really quantized) is left alone, and transformers' refusal
    stands."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model, "config", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if (quantizer is None or str(getattr(method, "value", method)) != "gguf"
            or not all(p.dtype.is_floating_point for p in model.parameters())):
        yield
        return
    fields = vars(config) if config is not None else {}
    saved = fields.pop("quantization_config", None)
    hf_model: Any = model  # a transformers PreTrainedModel: hf_quantizer is its attribute
    hf_model.hf_quantizer = None
    try:
        yield
    finally:
        hf_model.hf_quantizer = quantizer
        if saved is not None:
            fields["quantization_config"] = saved


def _meta_model(config: Any, model_class: str | None, dtype: torch.dtype | None) -> PreTrainedModel:
    import transformers
    from transformers import AutoModelForCausalLM

    cls = getattr(transformers, model_class, None) if model_class else None
    with torch.device("meta"):
        if cls is not None and hasattr(cls, "_from_config"):
            return cls._from_config(config, dtype=dtype)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _config_from_dict(data: dict[str, Any]):
    from transformers import AutoConfig

    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def _hf_config(model: nn.Module, plan: Plan, base_config: Any) -> Any | None:
    """The base config with the plan's uniform fields, if it builds exactly the pruned shapes."""
    updates = config_updates(plan, base_config)
    if not updates:
        return None
    cfg = _config_from_dict(base_config.to_dict())
    for k, v in updates.items():
        setattr(cfg, k, v)
    try:
        probe = _meta_model(cfg, type(model).__name__, None)
    except Exception:
        return None
    want = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    got = {n: tuple(p.shape) for n, p in probe.named_parameters(remove_duplicate=False)}
    if want != got:
        return None
    if getattr(cfg, "_experts_implementation", None) not in (None, "eager") and not all(
            grouped_mm_aligned(m) for m in model.modules()):
        return None  # plain HF loading would run grouped GEMM on unaligned widths
    return cfg


def save_pruned(model: nn.Module, plan: Plan, path: str | os.PathLike, tokenizer: Any = None,
                *, overwrite: bool = False) -> Path:
    """Save a model sliced with ``plan`` so that :func:`from_pretrained` rebuilds it exactly.

    Raises:
        CheckpointError: ``path`` exists (pass ``overwrite=True``), or the model's shapes are not
            what ``plan`` makes of its base model. Nothing is written then.
        PreconditionError: the model still carries gates.
    """
    from safetensors.torch import save_file

    from prunegraph.plan.gating import has_gates

    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; choose another folder or pass "
                              f"overwrite=True")
    if has_gates(model):
        raise PreconditionError("the model still has gates; remove them (remove_gates) and slice "
                                "it (apply_plan) before saving")
    if plan.fingerprint is None:
        raise CheckpointError("the plan has no base-model fingerprint, so the base architecture "
                              "cannot be rebuilt; build it with Plan.from_keep(..., model=base)")
    source = {k: v for k, v in plan.fingerprint["config"].items() if k not in _SOURCE_ONLY}
    base_config = _config_from_dict(dict(source, dtype=str(next(model.parameters()).dtype)
                                         .removeprefix("torch.")))
    extensions = registered_extensions(load=True)
    added = set().union(*(ext.extra_params(model) for ext in extensions.values()))
    _check_shapes(model, plan, plan.fingerprint["params"], skip=added)

    tied = tied_names(model)
    aliases = {n for names in tied for n in names[1:]}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if k not in aliases}
    persistent = set(model.state_dict())
    buffers = {n: b.detach().contiguous().cpu() for n, b in model.named_buffers()
               if n not in persistent and b is not None}
    hf_config = _hf_config(model, plan, base_config)
    config_json, per_layer = _config_json(model, plan, base_config, hf_config)
    extra = {"base_config": base_config.to_dict(), "model_class": type(model).__name__,
             "tied": tied, "hf_compatible": hf_config is not None}
    for name, ext in extensions.items():
        described = ext.describe(model)
        if described is not None:
            extra[name] = described  # the runtime is rebuilt from this on load

    def write(tmp: Path) -> None:
        import json

        from prunegraph.plan.model_card import UNIFORM_HINT, write_model_card

        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        save_file(buffers, str(tmp / BUFFERS), metadata={"format": "pt"})
        plan.write_files(tmp, PLAN_STEM, extra)
        plan_sha = json.loads((tmp / f"{PLAN_STEM}.json").read_text())["tensors"]["sha256"]
        config_json["prunegraph"] = {
            "loader": "prunegraph.from_pretrained",
            "plan": f"{PLAN_STEM}.json", "plan_sha256": plan_sha,
            "base_model_class": type(model).__name__,
            "uniform": hf_config is not None,
            "base_widths": {k: getattr(base_config, k) for v in per_layer.values() for k in v},
            "per_layer": {str(k): v for k, v in per_layer.items()},
            "note": ("a standard config: plain transformers loads this folder"
                     if hf_config is not None else
                     f"the layers have different widths; {UNIFORM_HINT}")}
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_model_card(tmp)

    with atomic_dir(path) as tmp:
        write(tmp)
    return path


def _config_json(model: nn.Module, plan: Plan, base_config: Any, hf_config: Any
                 ) -> tuple[dict[str, Any], dict[int, dict[str, int]]]:
    """``(config.json as a dict, per-layer widths)`` for the saved weights: the uniform config
    when there is one; else the base config with transformers' ``per_layer_config`` if its
    config class accepts those overrides (it then reads the widths, and builds them where its
    modeling code supports per-layer configs), else the base config."""
    import json

    from prunegraph.plan.slicing import per_layer_updates

    per_layer = per_layer_updates(plan, base_config)
    if hf_config is not None:
        return json.loads(hf_config.to_json_string()), per_layer
    config = base_config
    if per_layer:
        try:
            candidate = _config_from_dict({**base_config.to_dict(), "per_layer_config": per_layer})
            if getattr(candidate, "is_heterogeneous", False):
                config = candidate
        except Exception:  # this transformers has no per-layer configs for the architecture
            pass
    return json.loads(config.to_json_string()), per_layer


def _check_shapes(model: nn.Module, plan: Plan, base_params: dict[str, Any],
                  skip: Set[str] = frozenset()) -> None:
    """Refuse to save a model whose shapes are not the plan applied to its base model (the
    fingerprint's ``base_params`` shapes; parameters in ``skip``, such as PrunePath routers, are
    added on top of the plan)."""
    want = plan.sliced_shapes({n: tuple(s) for n, s in base_params.items()})
    for names in tied_names(model):  # a tensor held under several names (a shared block)
        for alias in names[1:]:
            if names[0] in want and alias in want:
                want[alias] = want[names[0]]
    got = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)
           if n not in skip}
    if want != got:
        diff = [f"{n}: expected {want.get(n)}, model {got.get(n)}"
                for n in sorted(set(want) | set(got)) if want.get(n) != got.get(n)]
        raise CheckpointError("the model is not the plan's base model sliced by the plan ("
                              + "; ".join(diff[:4]) + (" ..." if len(diff) > 4 else "")
                              + "); slice the base model with apply_plan(model, plan) first")


def _rebuild_extensions(model: nn.Module, extra: dict[str, Any], path: Path) -> None:
    """Reinstall every method runtime the checkpoint records (PrunePath's routers ...)."""
    extensions = registered_extensions(load=True)
    for name, described in extra.items():
        if name in _PLAN_EXTRA_KEYS or not described:
            continue
        if name not in extensions:
            raise CheckpointError(f"{path / (PLAN_STEM + '.json')} records a {name!r} runtime, "
                                  f"but no installed plugin rebuilds it; install the package "
                                  f"that provides it")
        try:
            extensions[name].rebuild(model, described)
        except (KeyError, TypeError, PrunegraphError) as e:
            raise CheckpointError(f"{path / (PLAN_STEM + '.json')}: the {name} runtime cannot "
                                  f"be rebuilt ({e}); {_FIX}") from e


def from_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
    """Load a folder written by :func:`save_pruned` (see the module docstring).

    Raises:
        CheckpointError: a missing, truncated or corrupt file, named with the fix.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass the folder save_pruned wrote")
    for name in (WEIGHTS, BUFFERS, "config.json", f"{PLAN_STEM}.json", f"{PLAN_STEM}.safetensors"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing; {_FIX}")
    try:
        plan, extra = Plan.read_files(path, PLAN_STEM, fix=_FIX)
    except PlanError as e:
        raise CheckpointError(str(e)) from e
    _check_plan_matches_config(path, plan)
    if "base_config" not in extra:
        raise CheckpointError(f"{path / (PLAN_STEM + '.json')} has no base config; {_FIX}")
    tensors = {}
    for name in (WEIGHTS, BUFFERS):
        try:
            tensors[name] = load_file(str(path / name))
        except Exception as e:
            raise CheckpointError(f"{path / name} is truncated or corrupt ({e}); {_FIX}") from e

    config = _config_from_dict(extra["base_config"])
    dtype = dtype or getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = _meta_model(config, extra.get("model_class"), dtype)
    try:
        apply_plan(model, plan, structural=True)
    except PlanError as e:
        raise CheckpointError(f"{path}: the stored plan does not fit the stored base config "
                              f"({e}); {_FIX}") from e
    _rebuild_extensions(model, extra, path)

    weights, buffers = tensors[WEIGHTS], tensors[BUFFERS]
    aliases = {n for names in extra.get("tied", []) for n in names[1:]}
    expected = {k: v for k, v in model.state_dict().items() if k not in aliases}
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [f"{k} {list(weights[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
             if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path / WEIGHTS} does not match the pruned architecture: "
            + "; ".join(f"{label}: {', '.join(items[:4])}" for label, items in
                        (("missing", missing), ("unexpected", unexpected), ("shape", wrong)) if items)
            + f"; {_FIX}")
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    model.load_state_dict(weights, strict=False, assign=True)
    for names in extra.get("tied", []):
        param = model.get_parameter(names[0])
        for alias in names[1:]:
            module_path, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(module_path) if module_path else model, attr, param)
    for name, value in buffers.items():
        module_path, _, attr = name.rpartition(".")
        owner = model.get_submodule(module_path) if module_path else model
        if attr not in owner._buffers:
            raise CheckpointError(f"{path / BUFFERS} holds {name!r}, which the model has no "
                                  f"buffer for; {_FIX}")
        owner._buffers[attr] = value
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"{path}: no stored values for {', '.join(left[:5])}; {_FIX}")
    gen_file = path / "generation_config.json"
    if gen_file.is_file() and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))
    # PreTrainedModel.to is @wraps(nn.Module.to): mypy reads the unbound signature (self first)
    return model.to(device).eval()  # type: ignore[arg-type]


def _check_plan_matches_config(path: Path, plan: Plan) -> None:
    """Refuse a plan that was not saved with this folder's weights, before reading them: the
    plan's hash recorded in config.json, or (older folders) the architecture fields of
    config.json against the plan's base model."""
    import json

    from prunegraph.plan.slicing import CONFIG_FIELDS

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'} is corrupt or truncated ({e}); "
                              f"{_FIX}") from e
    plan_file = path / f"{PLAN_STEM}.json"
    recorded = (config.get("prunegraph") or {}).get("plan_sha256")
    if recorded is not None:
        held = json.loads(plan_file.read_text()).get("tensors", {}).get("sha256")
        if held != recorded:
            raise CheckpointError(
                f"{plan_file} is not the plan these weights were saved with (config.json "
                f"records plan {recorded[:12]}..., the folder holds {str(held)[:12]}...): the "
                f"plan comes from another model or run. {_FIX[0].upper()}{_FIX[1:]}")
        return
    base = (plan.fingerprint or {}).get("config") or {}
    pruned = {a for fields in CONFIG_FIELDS.values() for names, _ in fields for a in names}
    keys = [k for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                        "head_dim", "n_embd", "n_layer") if k not in pruned]
    diff = [f"{k}: plan {base.get(k)!r}, config.json {config.get(k)!r}" for k in keys
            if k in base and k in config and base[k] != config[k]]
    if diff:
        raise CheckpointError(f"{plan_file} is the plan of another model ({'; '.join(diff)}): "
                              f"the plan and the weights must come from the same save. "
                              f"{_FIX[0].upper()}{_FIX[1:]}")


def saved_plan(path: str | os.PathLike) -> Plan | None:
    """The plan stored in a folder written by :func:`save_pruned`, or None for any other folder."""
    path = Path(path)
    if not (path / f"{PLAN_STEM}.json").is_file():
        return None
    try:
        return Plan.read_files(path, PLAN_STEM, fix=_FIX)[0]
    except PlanError as e:
        raise CheckpointError(str(e)) from e
