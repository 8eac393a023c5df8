# Copyright 2026 The modeling-grin authors. Licensed under the MIT License.
"""Configuration of GRIN-MoE (and of Phi-3.5-MoE, which shares its architecture)."""

import dataclasses
import functools
import math

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

ROUTER_TYPES = ("sparsemixer_v2", "softmax_topk")
LOAD_BALANCING = ("local", "global")
NORM_TYPES = ("layernorm", "rmsnorm")
ROUTER_PRECISIONS = ("float32", "logits")
AUX_LOSS_TYPES = ("switch", "gshard")
# The rotary embedding (transformers' Phimoe one) reads longrope's attention scales for every non-default type, so
# these two are the types it can run.
ROPE_TYPES = ("default", "longrope")

# The released microsoft/GRIN-MoE config.json points AutoConfig/AutoModelForCausalLM at Hub remote-code files with
# these module names. Our registered classes replace them, so the entries are dropped instead of saved back.
_RELEASED_REMOTE_MODULES = ("configuration_grinmoe.", "modeling_grinmoe.")


def _require(condition: bool, field: str, allowed: str, value) -> None:
    if not condition:
        raise ValueError(f"`{field}` must be {allowed}, got {value!r}")


def validate_moe_fields(config) -> None:
    """Range checks shared by every config of this package (GRIN-MoE and MH-MoE)."""
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        value = getattr(config, field)
        _require(value >= 1, field, "a positive integer", value)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    _require(1 <= kv_heads <= heads and heads % kv_heads == 0, "num_key_value_heads",
             f"a divisor of num_attention_heads ({heads})", kv_heads)
    # q_proj maps hidden_size -> heads * head_dim and o_proj back, so hidden_size need not be a multiple of the heads;
    # RoPE rotates channel pairs, so head_dim (set, or hidden_size // num_attention_heads) must be positive and even.
    if config.head_dim is None:
        _require((config.hidden_size // heads) % 2 == 0 and config.hidden_size >= 2 * heads, "hidden_size",
                 f"at least 2 * num_attention_heads ({2 * heads}) with hidden_size // num_attention_heads even (that "
                 "quotient is head_dim when head_dim is not set, and RoPE needs an even one)", config.hidden_size)
    else:
        _require(config.head_dim >= 1 and config.head_dim % 2 == 0, "head_dim", "a positive even integer",
                 config.head_dim)
    _require(config.num_local_experts >= 1, "num_local_experts", "a positive integer", config.num_local_experts)
    _require(1 <= config.num_experts_per_tok <= config.num_local_experts, "num_experts_per_tok",
             f"in 1..num_local_experts (1..{config.num_local_experts})", config.num_experts_per_tok)
    _require(config.router_type in ROUTER_TYPES, "router_type", f"one of {ROUTER_TYPES}", config.router_type)
    _require(config.norm_type in NORM_TYPES, "norm_type", f"one of {NORM_TYPES}", config.norm_type)
    _require(config.router_precision in ROUTER_PRECISIONS, "router_precision", f"one of {ROUTER_PRECISIONS}",
             config.router_precision)
    _require(config.aux_loss_type in AUX_LOSS_TYPES, "aux_loss_type", f"one of {AUX_LOSS_TYPES}",
             config.aux_loss_type)
    _require(config.aux_loss_type == "switch" or config.load_balancing == "local", "load_balancing",
             "'local' with aux_loss_type='gshard' (the official MH-MoE loss is per rank)", config.load_balancing)
    _require(config.router_jitter_noise >= 0, "router_jitter_noise", "non-negative", config.router_jitter_noise)
    _require(0 <= config.input_jitter_noise < 1, "input_jitter_noise", "in [0, 1)", config.input_jitter_noise)
    _require(config.router_aux_loss_coef >= 0, "router_aux_loss_coef", "non-negative", config.router_aux_loss_coef)
    _require(config.router_z_loss_coef >= 0, "router_z_loss_coef", "non-negative", config.router_z_loss_coef)
    _require(config.load_balancing in LOAD_BALANCING, "load_balancing", f"one of {LOAD_BALANCING}",
             config.load_balancing)
    _require(0 <= config.attention_dropout < 1, "attention_dropout", "in [0, 1)", config.attention_dropout)
    _require(config.rms_norm_eps > 0, "rms_norm_eps", "positive", config.rms_norm_eps)
    _require(config.max_position_embeddings >= 1, "max_position_embeddings", "a positive integer",
             config.max_position_embeddings)
    _require(config.sliding_window is None or config.sliding_window >= 1, "sliding_window",
             "None or a positive integer", config.sliding_window)
    _require(config.hidden_act in ACT2FN, "hidden_act", "an activation name known to transformers", config.hidden_act)
    _require(_is_finite_number(config.initializer_range) and config.initializer_range >= 0, "initializer_range",
             "a finite number >= 0 (the standard deviation of the initial weights)", config.initializer_range)
    # nn.Embedding takes the pad id as its padding_idx and accepts -vocab_size..vocab_size-1 (negative ids count from
    # the end, as some released configs' pad_token_id=-1 does).
    vocab, pad = config.vocab_size, config.pad_token_id
    _require(pad is None or -vocab <= pad < vocab, "pad_token_id", f"None or a token id below vocab_size ({vocab})",
             pad)


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_rope(config) -> None:
    """The RoPE type and base the rotary embedding can use; Phi-3.5-MoE's longrope also carries its attention scales.

    Checks the keys present: an assignment may hold a legacy dict that transformers standardizes right after.
    """
    rope = config.rope_parameters or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _require(rope_type in ROPE_TYPES, "rope_parameters['rope_type']", f"one of {ROPE_TYPES}", rope_type)
    if "rope_theta" in rope:
        # A base <= 0 or NaN gives NaN rotations, which only surface later as NaN router logits.
        _require(_is_finite_number(rope["rope_theta"]) and rope["rope_theta"] > 0, "rope_theta",
                 "a finite positive number", rope["rope_theta"])
    if rope_type == "longrope":
        for key in ("short_mscale", "long_mscale"):
            _require(_is_finite_number(rope.get(key)), f"rope_parameters['{key}']", "a number for longrope",
                     rope.get(key))


def drop_released_auto_map(kwargs: dict) -> None:
    """Remove `auto_map` entries that name the released checkpoint's remote-code files (see module note)."""
    auto_map = kwargs.get("auto_map")
    if not isinstance(auto_map, dict):
        return
    kept = {
        auto_class: reference
        for auto_class, reference in auto_map.items()
        if not str(reference).split("--")[-1].startswith(_RELEASED_REMOTE_MODULES)
    }
    if kept:
        kwargs["auto_map"] = kept
    else:
        del kwargs["auto_map"]


@strict
class GrinMoeConfig(PreTrainedConfig):
    r"""
    Configuration of a GRIN-MoE model. Defaults reproduce the released `microsoft/GRIN-MoE` (16x3.8B, top-2), and the
    released `config.json` (including its old-style top-level `rope_theta` and its `auto_map`) loads unchanged. Field
    names follow transformers' `PhimoeConfig`, so a Phi-3.5-MoE config (`rope_scaling` of type `longrope`) reads too.

    GRIN-specific notes:
        - `rms_norm_eps` is the epsilon of the LayerNorms (GRIN uses LayerNorm with bias, not RMSNorm).
        - `router_jitter_noise` is SparseMixer-v2's `jitter_eps`: experts whose logit is more than
          `2 * router_jitter_noise` (relative) below the best remaining one are masked out of the softmax.
        - `input_jitter_noise` multiplies the MoE input by U(1 - eps, 1 + eps) noise in training, once.

    Args:
        router_type (`str`, defaults to `"sparsemixer_v2"`):
            `"sparsemixer_v2"` (GRIN's gradient-informed router) or `"softmax_topk"` (GShard/Mixtral style).
        router_renormalize (`bool`, defaults to `True`):
            Only for `softmax_topk`: renormalise the top-k softmax weights to sum to one (Mixtral) or not (GShard).
        head_dim (`int`, *optional*):
            Attention head size; defaults to `hidden_size // num_attention_heads`.
        load_balancing (`str`, defaults to `"local"`):
            `"local"`: the load-balancing loss of each process's micro-batch; `"global"`: expert frequencies counted
            over the whole data-parallel group (GRIN's recipe).
        router_z_loss_coef (`float`, defaults to 0): weight of the router z-loss (ST-MoE), added to the LM loss.
        router_precision (`str`, defaults to `"float32"`):
            The dtype of the routing math (mask, softmax, sampling): `"float32"`, or `"logits"`: the router logits'
            own dtype, as GRIN's released code (and transformers' Phimoe) computes it, for bit-exact agreement with
            it in bf16. In bf16 the two differ on boundary logits (a second-slot weight 0.5 instead of 1.0 for about
            0.01 % of rows).
        aux_loss_type (`str`, defaults to `"switch"`):
            `"switch"`: the Switch load-balancing loss with f and P pooled over all MoE layers and every top-k slot
            counted (transformers' Mixtral/Phimoe convention; GRIN's recipe with `load_balancing="global"`);
            `"gshard"`: the official MH-MoE code's GShard loss, `E * sum_i me_i * ce_i` per layer on the top-1
            assignment, summed over the layers (requires `load_balancing="local"`).
        norm_type (`str`, defaults to `"layernorm"`):
            GRIN's LayerNorm with bias, or `"rmsnorm"` (e.g. for models upcycled from Llama/Phi-3 checkpoints).
        bitnet (`bool`, defaults to `False`):
            BitNet b1.58 quantization-aware training: the attention projections, dense FFNs and experts compute with
            ternary weights (absmean, a scale per matrix and per expert) and int8 activations (absmax per row), with
            straight-through gradients to the full-precision latent weights; embeddings, norms, routers and the
            lm_head stay full precision (docs/bitnet.md). `modeling_grin.bitnet_export` writes the 2-bit packed model.
    """

    model_type = "grinmoe"
    keys_to_ignore_at_inference = ["cache", "router_logits", "aux_loss"]
    default_theta = 10000.0
    attribute_map = {"num_experts": "num_local_experts"}
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
    }
    # Expert parallelism (`DistributedConfig(ep_size=...)`): each rank holds E / ep_size whole experts; pairs routed
    # to another rank's experts arrive as sentinel ids >= the local count, which every experts implementation skips.
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 6400
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 32000
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    sliding_window: int | None = 2047
    attention_dropout: float | int = 0.0
    attention_bias: bool = True
    lm_head_bias: bool = True
    num_local_experts: int = 16
    num_experts_per_tok: int = 2
    router_type: str = "sparsemixer_v2"
    router_renormalize: bool = True
    router_jitter_noise: float | int = 0.01
    input_jitter_noise: float | int = 0.01
    output_router_logits: bool = False
    router_aux_loss_coef: float | int = 0.001
    load_balancing: str = "local"
    router_z_loss_coef: float | int = 0.0
    norm_type: str = "layernorm"
    router_precision: str = "float32"
    aux_loss_type: str = "switch"
    bitnet: bool = False

    def __post_init__(self, **kwargs):
        # An alias (`num_experts`) would otherwise be set by transformers after the checks below, unchecked.
        for alias, name in self.attribute_map.items():
            if alias in kwargs:
                setattr(self, name, kwargs.pop(alias))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        drop_released_auto_map(kwargs)
        validate_moe_fields(self)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        # Phi-3.5-MoE's longrope scales are read by our rotary embedding, not by transformers' generic validation.
        self.ignore_keys_at_rope_validation = {"short_mscale", "long_mscale"}
        super().__post_init__(**kwargs)  # standardizes rope_parameters, then marks the config `_post_init_done`
        validate_rope(self)

    # ----- validation after construction ------------------------------------------------------------------------
    # `@strict` checks types on every assignment, and range rules only through per-field validators that see one
    # value; ours relate fields (top-k <= experts, kv heads divide heads, pad id < vocab), so an assignment re-runs
    # the config's whole validation and is rolled back when it fails. `validate_moe_config` is also a `@strict`
    # class validator, so `config.validate()` and `save_pretrained` run it too.

    def validate_moe_config(self) -> None:
        """Raise `ValueError` naming the first field out of its range (subclasses add their own rules)."""
        validate_moe_fields(self)
        validate_rope(self)

    def __setattr__(self, name, value):
        name = self.attribute_map.get(name, name)
        # Before `_post_init_done` the config is half-built (__post_init__ derives fields and validates them itself).
        if not self.__dict__.get("_post_init_done") or self.__dict__.get("_validation_deferred") \
                or name not in _own_fields(type(self)):
            super().__setattr__(name, value)
            return
        previous = self.__dict__.get(name, _UNSET)
        super().__setattr__(name, value)
        try:
            self.validate_moe_config()
        except ValueError:
            self._restore(name, previous)
            raise

    def _restore(self, name: str, previous) -> None:
        if previous is _UNSET:
            self.__dict__.pop(name, None)
        else:
            self.__dict__[name] = previous  # the value passed every check before: no need to check it again

    def update(self, config_dict: dict) -> None:
        """Set several fields and validate them together: one at a time, a valid change of related fields (fewer
        experts and a smaller top-k) could fail halfway. On any error (a type, a range) the config is left as it was."""
        snapshot = dict(self.__dict__)
        self.__dict__["_validation_deferred"] = True
        try:
            super().update(config_dict)
            del self.__dict__["_validation_deferred"]
            self.validate_moe_config()
        except Exception:
            self.__dict__.clear()
            self.__dict__.update(snapshot)  # without `_validation_deferred`: assignments are checked again
            raise

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # transformers applies `from_pretrained(path, field=value)` overrides with setattr after construction, one at
        # a time. Handing them to the constructor instead validates them together with the rest, in any order.
        overrides = {}
        for key in list(kwargs):
            name = cls.attribute_map.get(key, key)
            if name in _own_fields(cls):
                overrides[name] = kwargs.pop(key)
        return super().from_dict({**config_dict, **overrides}, **kwargs)

    def to_dict(self) -> dict:
        output = super().to_dict()
        # transformers does not save the experts implementation. Keep a choice a user made (e.g. "fused") so the saved
        # model reloads with it; the default (grouped_mm) stays unsaved so that loading elsewhere may still fall back.
        if self._experts_implementation not in (None, "grouped_mm"):
            output["experts_implementation"] = self._experts_implementation
        return output


_UNSET = object()
_GENERIC_FIELDS = frozenset(field.name for field in dataclasses.fields(PreTrainedConfig))


@functools.cache
def _own_fields(config_class: type) -> frozenset[str]:
    """The fields this package declares (not transformers' generic ones such as `dtype` or `architectures`)."""
    return frozenset(field.name for field in dataclasses.fields(config_class)) - _GENERIC_FIELDS

__all__ = ["GrinMoeConfig"]
