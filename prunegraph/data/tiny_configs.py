"""Tiny random configs for *any* transformers model type, derived from the config class itself.

``tiny_config("mamba")`` takes the config class's defaults and shrinks them by field name, with no
per-model code: 2 layers, hidden 64, 4 attention heads over 2 kv heads (head_dim 16), 4 experts
with top-2 routing, a 256-token vocabulary. Per-layer lists (``layer_types``,
``layers_block_type``, a hybrid pattern string) keep the first layer of every distinct kind, so
a hybrid model keeps both its attention and its state-space layers; lists of layer indices are
remapped onto the layers kept. Sub-configs (``text_config``, a decoder's config) shrink the same
way. What the rules cannot guess sits in :data:`OVERRIDES`, a small declarative table.

Example::

    config = tiny_config("jamba")
    model = AutoModelForCausalLM.from_config(config)      # 2 layers: one Mamba, one attention+MoE

``prunegraph inspect random:<model_type>`` uses it for every type that is not in
:data:`prunegraph.data.models.RANDOM_CONFIGS`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["tiny_config", "tiny_model", "causal_lm_types", "OVERRIDES", "SIZES"]

LAYERS, HIDDEN, HEADS, KV_HEADS, EXPERTS, TOP_K, VOCAB = 2, 64, 4, 2, 4, 2, 256

#: field name -> tiny value, for every field that is set (not None) in the default config.
SIZES: dict[str, Any] = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "n_embed", "dim", "embed_dim",
                     "word_embed_proj_dim", "model_dim", "embedding_size", "embedding_dim",
                     "hidden_size_global",
                     # a vision or audio adapter's widths must meet the text model's hidden size
                     "adapter_in_dim", "adapter_out_dim", "adapter_input_size"),
                   HIDDEN),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads",
                     "encoder_attention_heads", "decoder_attention_heads",
                     "num_attention_heads_per_layer"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads",
                     "multi_query_group_num", "num_key_value_groups"), KV_HEADS),
    **dict.fromkeys(("head_dim", "attention_head_size", "kv_channels", "d_head", "d_kv",
                     "qk_nope_head_dim", "v_head_dim", "value_head_dim",
                     "key_head_dim", "linear_key_head_dim", "linear_value_head_dim", "dim_head",
                     "mamba_d_head", "mamba_head_dim", "ssm_head_dim"), HIDDEN // HEADS),
    **dict.fromkeys(("qk_rope_head_dim",), HIDDEN // HEADS),
    **dict.fromkeys(("rotary_dim", "rotary_emb_base_dim"), 8),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "encoder_ffn_dim",
                     "decoder_ffn_dim", "ffn_hidden_size", "d_ff", "inner_hidden_size",
                     "dense_intermediate_size", "feed_forward_proj_dim"), 96),
    **dict.fromkeys(("moe_intermediate_size", "expert_intermediate_size",
                     "moe_ffn_hidden_size", "expert_ffn_hidden_size"), 32),
    **dict.fromkeys(("shared_expert_intermediate_size", "shared_intermediate_size"), 48),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers",
                     "encoder_layers", "decoder_layers", "num_decoder_layers",
                     "num_encoder_layers", "num_blocks", "num_layers_per_stack"), LAYERS),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                     "num_routed_experts", "n_experts"), EXPERTS),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k",
                     "top_k", "experts_per_token", "num_selected_experts"), TOP_K),
    **dict.fromkeys(("vocab_size_per_layer_input",), VOCAB),
    **dict.fromkeys(("hidden_size_per_layer_input",), 16),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group"), 1),
    **dict.fromkeys(("q_lora_rank", "kv_lora_rank"), 32),
    **dict.fromkeys(("o_lora_rank",), 16),
    **dict.fromkeys(("vocab_size", "n_vocab"), VOCAB),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len",
                     "seq_length"), 512),
    **dict.fromkeys(("state_size", "ssm_state_size", "mamba_d_state", "d_state"), 8),
    # state-space heads: expand (2) x hidden = heads x head_dim
    **dict.fromkeys(("mamba_n_heads", "mamba_num_heads", "ssm_num_heads"), 2 * HEADS),
    **dict.fromkeys(("mamba_d_ssm", "d_inner"), 2 * HIDDEN),
    **dict.fromkeys(("lru_width",), HIDDEN),
    **dict.fromkeys(("linear_num_value_heads", "linear_num_key_heads"), HEADS),
    **dict.fromkeys(("mamba_n_groups", "n_groups", "ssm_n_groups"), 1),
    **dict.fromkeys(("time_step_rank", "mamba_dt_rank", "dt_rank"), 8),
    **dict.fromkeys(("sliding_window", "attention_window", "window_size"), 8),
}

#: model_type -> extra config fields the rules above cannot derive (kept small on purpose).
OVERRIDES: dict[str, dict[str, Any]] = {
    # attention and experts on a layer period of 8 / 2: with 2 layers, put one of each in
    "mamba2": dict(num_heads=2 * HEADS),  # its SSM heads are named like attention heads
    "zaya": dict(num_experts_per_tok=1),  # the class supports top-1 only
    # hybrids whose default config has no attention layer (forward needs one)
    "bamba": dict(attn_layer_indices=[1]),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"]),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
    "dory": dict(layer_types=None, num_hidden_layers=3, n_input_layers=1, n_recurrent_layers=1,
                 n_output_layers=1),
    # its sliding-window layers use head_dim = qk_nope_head_dim + qk_rope_head_dim
    "dots3_note_text": dict(head_dim=2 * (HIDDEN // HEADS)),
    # block-sparse attention needs sequences of 700+ tokens; below that the model rebuilds its
    # attention modules at run time from the config (dropping pruned widths)
    "big_bird": dict(attention_type="original_full"),
    "bigbird_pegasus": dict(attention_type="original_full"),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "lfm2": dict(layer_types=["conv", "full_attention"], full_attn_idxs=[1]),
    "gemma3n_text": dict(num_kv_shared_layers=0),  # kv sharing needs more layers than 2
    "qwen4_exp_text": dict(indexer_n_heads=HEADS, indexer_kv_heads=1, indexer_head_dim=16,
                           indexer_budget=16, indexer_compress_ratio=4),
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default",
                                                                    "rope_theta": 10000.0}}),
    # default configs this transformers release cannot build as they are
    "dots1": dict(n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K, n_shared_experts=1),
    "dbrx": dict(attn_config=dict(kv_n_heads=KV_HEADS, rope_theta=10000.0, clip_qkv=8.0)),
    "xlstm": dict(qk_dim_factor=1.0),
    "xmod": dict(default_language="en_XX"),
    "reformer": dict(axial_pos_embds_dim=[16, 48], axial_pos_shape=[8, 8],
                     local_attn_chunk_length=8, lsh_attn_chunk_length=8),
    # shared attention blocks on two of three layers; attention width is 2 x hidden
    "zamba": dict(num_hidden_layers=3, layers_block_type=["linear_attention", "hybrid", "hybrid"],
                  attention_hidden_size=2 * HIDDEN, attention_head_dim=2 * HIDDEN // HEADS),
    # one output group per head (the default groups split heads, which slicing cannot follow)
    "deepseek_v4": dict(o_groups=HEADS),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1),
}

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers",
               "encoder_layers", "num_decoder_layers", "num_encoder_layers", "num_blocks")
#: fields whose None default leaves the model unbuildable (``head_dim ** -0.5``, top-k of None)
_SET_WHEN_NONE = {"num_key_value_heads", "head_dim", "n_group", "topk_group"}
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                "num_routed_experts", "n_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k",
               "experts_per_token", "num_selected_experts")
_NOT_CONFIGS = {"rope_scaling", "rope_parameters", "id2label", "label2id", "quantization_config"}
_INDEX_LIST_HINTS = ("idx", "ids", "indices", "index", "_layers")
_SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
                "mask_token_id", "unk_token_id", "decoder_start_token_id",
                "forced_bos_token_id", "forced_eos_token_id")


def causal_lm_types() -> list[str]:
    """Every model type the installed transformers maps to a causal-LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _layer_count(d: dict) -> int | None:
    for key in _LAYER_KEYS:
        if isinstance(d.get(key), int) and not isinstance(d.get(key), bool):
            return d[key]
    return None


def _index_list(key: str, value: Any, layers: int) -> bool:
    """A list of layer indices (``full_attn_idxs``, ``moe_layers``): increasing, in range."""
    return isinstance(value, (list, tuple)) and bool(value) and any(
        h in key for h in _INDEX_LIST_HINTS) and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers for i in value) and all(
        a < b for a, b in zip(value, value[1:]))


def _per_layer(key: str, value: Any, layers: int) -> bool:
    """A per-layer list (``layer_types``), or a per-layer pattern string (``hybrid_pattern``)."""
    if layers < 2 or _index_list(key, value, layers):
        return False
    if isinstance(value, (list, tuple)):
        return len(value) == layers
    return isinstance(value, str) and "pattern" in key and len(value) == layers


def _kept_layers(d: dict, layers: int) -> list[int]:
    """The first layer of every distinct kind (across all per-layer lists), at least LAYERS."""
    per_layer = [v for k, v in d.items() if _per_layer(k, v, layers)]
    per_layer += [{int(i): str(v) for i, v in m.items()} for m in _layer_maps(d, layers).values()]
    seen: dict[tuple, int] = {}
    for i in range(layers):
        kind = tuple(str(v.get(i)) if isinstance(v, dict) else str(v[i]) for v in per_layer)
        seen.setdefault(kind, i)
    kept = set(seen.values())
    for i in range(layers):
        if len(kept) >= LAYERS:
            break
        kept.add(i)
    return sorted(kept)


def _layer_maps(d: dict, layers: int) -> dict[str, dict]:
    """Dicts keyed by layer index (``per_layer_config``)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in _NOT_CONFIGS and all(
                str(i).isdigit() and int(i) < layers for i in v):
            out[k] = v
    return out


def _shrink(d: dict) -> dict:
    """The fields of config dict ``d`` that change (sub-config dicts keep their model_type)."""
    layers = _layer_count(d)
    n = layers or 0
    kept: list[int] = _kept_layers(d, n) if n else []
    maps = _layer_maps(d, n) if n else {}
    out: dict[str, Any] = {}
    for key, value in d.items():
        if key in maps:
            out[key] = {type(i)(kept.index(int(i))): dict(v, **_shrink(v)) if isinstance(v, dict)
                        else v for i, v in value.items() if int(i) in kept}
        elif isinstance(value, dict) and key not in _NOT_CONFIGS:
            sub = _shrink(value)
            sub.update(OVERRIDES.get(str(value.get("model_type")), {}))
            if sub:
                out[key] = dict(value, **sub) if "model_type" not in value else \
                    {"model_type": value["model_type"], **sub}
        elif key in SIZES and not isinstance(value, bool):
            if value is None and (key in _SET_WHEN_NONE or key in _TOP_K_KEYS + _EXPERT_KEYS
                                  and any(d.get(k) is not None for k in _EXPERT_KEYS)
                                  or key in _EXPERT_KEYS and any(d.get(k) is not None
                                                                 for k in _TOP_K_KEYS)):
                out[key] = SIZES[key]
            elif isinstance(value, int) and value > 0 and value != SIZES[key]:
                out[key] = SIZES[key]
            elif isinstance(value, list) and layers and len(value) == layers:
                out[key] = [SIZES[key]] * len(kept)
        elif kept and _per_layer(key, value, n):
            picked = [value[i] for i in kept]
            out[key] = "".join(picked) if isinstance(value, str) else type(value)(picked)
        elif kept and _index_list(key, value, n):
            out[key] = type(value)(kept.index(i) for i in value if i in kept)
        elif key == "is_decoder" and value is False:
            out[key] = True  # encoder families used as causal LMs
    if d.get("kv_lora_rank") and d.get("num_key_value_heads"):
        out["num_key_value_heads"] = HEADS  # multi-head latent attention: one kv per head
    if kept:
        for key in _LAYER_KEYS:
            if isinstance(d.get(key), int) and not isinstance(d.get(key), bool):
                out[key] = len(kept)
    vocab = out.get("vocab_size", d.get("vocab_size"))
    if isinstance(vocab, int):
        for key in _SPECIAL_IDS:
            if isinstance(d.get(key), int) and d[key] >= vocab:
                out[key] = min(vocab - 1, 3)
    return out


def tiny_config(model_type: str, **extra: Any):
    """A tiny config of ``model_type`` (see the module docstring); ``extra`` fields win."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    base = cls().to_dict()
    for key in ("transformers_version", "architectures", "_name_or_path", "model_type"):
        base.pop(key, None)
    d = _shrink(base)
    d.update(OVERRIDES.get(model_type, {}))
    d.update(extra)
    return cls(**d)


def tiny_model(model_type: str, *, dtype=None, seed: int = 0):
    """The causal LM of ``model_type`` on its tiny config, randomly initialised, in eval mode.

    A composite config whose causal-LM class takes one of its sub-configs (a decoder's) is
    unwrapped to that sub-config.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    dtype = dtype or torch.float32
    config = tiny_config(model_type)
    torch.manual_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    except (AttributeError, TypeError, ValueError) as e:
        model_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], None)
        want = getattr(model_cls, "config_class", None)
        subs = [v for v in vars(config).values() if want is not None and isinstance(v, want)]
        if model_cls is None or not subs:
            raise
        torch.manual_seed(seed)
        try:
            return model_cls._from_config(subs[0], dtype=dtype).eval()
        except Exception:
            raise e from None
