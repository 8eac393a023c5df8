# Copyright 2026 The modeling-grin authors. Licensed under the MIT License.
"""Configuration of MH-MoE (multi-head MoE, arXiv 2404.15045 / 2411.16205) and its FLOPs/parameter parity helpers."""

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict

from .configuration_grin_moe import GrinMoeConfig

INIT_STYLES = ("normal", "official")


def validate_mh_moe_fields(config) -> None:
    """The fields MH-MoE adds to GRIN-MoE's (which `validate_moe_fields` checks)."""
    moe_heads, hidden_size = config.moe_heads, config.hidden_size
    if not (isinstance(moe_heads, int) and moe_heads >= 1 and hidden_size % moe_heads == 0):
        raise ValueError(
            f"`moe_heads` must be a positive divisor of hidden_size ({hidden_size}): each token is split into "
            f"moe_heads sub-tokens of equal size, got {moe_heads!r}"
        )
    if config.moe_layer_frequency < 0:
        raise ValueError(f"`moe_layer_frequency` must be >= 0 (0: no MoE layer), got {config.moe_layer_frequency!r}")
    if config.dense_intermediate_size < 1:
        raise ValueError(
            f"`dense_intermediate_size` must be a positive integer, got {config.dense_intermediate_size!r}"
        )
    if config.shared_expert_intermediate_size < 0:
        raise ValueError(
            f"`shared_expert_intermediate_size` must be >= 0 (0: none), got {config.shared_expert_intermediate_size!r}"
        )
    if config.init_style not in INIT_STYLES:
        raise ValueError(f"`init_style` must be one of {INIT_STYLES}, got {config.init_style!r}")


@strict
class MhMoeConfig(GrinMoeConfig):
    r"""
    Configuration of an MH-MoE decoder. It shares GRIN-MoE's decoder and field names; what MH-MoE adds is the MoE block:
    a head projection d→d, a split of every token into `moe_heads` sub-tokens of size d/h routed independently by one
    router (input d/h) to `num_experts_per_tok` of `num_local_experts` SwiGLU experts (d/h → `intermediate_size` → d/h),
    the sub-token outputs put back in token order, and a merge projection d→d.

    Defaults are the paper's MH-MoE h=2 setting (arXiv 2411.16205, Table 1): d=768, 12 layers, an MoE block every second
    layer, 40 experts of size 768, top-2, SwiGLU dense FFN of 2048 elsewhere, RMSNorm, no biases, softmax top-k routing
    on raw probabilities (as the released code), no jitter.

    Args:
        moe_heads (`int`): sub-tokens per token, h; must divide `hidden_size`. h=1 without head/merge is a plain SMoE.
        use_head_projection / use_merge_projection (`bool`): the head and merge layers (the paper's ablation, Table 5).
        head_merge_bias (`bool`): biases on the head and merge layers (the released code has them; the equations not).
        moe_layer_frequency (`int`): every `f`-th layer (layers f-1, 2f-1, ...) is an MoE layer, the others use a dense
            SwiGLU FFN of `dense_intermediate_size`; 1 = every layer, 0 = no MoE layer (the dense baseline).
        dense_intermediate_size (`int`): hidden size of the dense FFN layers.
        shared_expert_intermediate_size (`int`): if > 0, a SwiGLU expert of this size on the whole token, added to every
            MoE block's output (the paper's shared-expert setting, Table 2).
        norm_type (`str`): `"rmsnorm"` or `"layernorm"`.
        mlp_bias (`bool`): biases in the dense FFN and the shared expert.
        init_style (`str`): the MoE block's initialisation. Both: Xavier-uniform head layer (gain 1/sqrt(2)) and merge
            layer, merge bias 0. `"normal"`: router and experts normal(0, initializer_range), head bias 0;
            `"official"`: as the official code leaves them, PyTorch's `nn.Linear` default U(-1/sqrt(fan_in),
            1/sqrt(fan_in)) for the router, each expert's matrices and the head bias (router std 1/sqrt(3 d/h)).
        bitnet (`bool`): BitNet b1.58 training as for GRIN-MoE (attention, dense FFNs, shared expert and experts
            ternary; activations int8 per row, per sub-token for the experts); the head and merge layers stay full
            precision, as in the official MH-MoE code.
    """

    model_type = "mh_moe"
    # GRIN's plan (attention heads, every expert's intermediate features), plus MH-MoE's dense SwiGLU FFN layers and
    # shared expert, sharded Megatron-style on their intermediate size (colwise gate/up, rowwise down). The head and
    # merge projections stay replicated: the split into sub-tokens needs every feature of the projected token, and
    # the merge reads the experts' summed (replicated) output. A rule whose modules this config does not build (dense
    # rules with `moe_layer_frequency=1`, shared-expert rules without one) is skipped with a warning.
    base_model_tp_plan = {
        **GrinMoeConfig.base_model_tp_plan,
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
        "layers.*.mlp.shared_expert.gate_proj": "colwise",
        "layers.*.mlp.shared_expert.up_proj": "colwise",
        "layers.*.mlp.shared_expert.down_proj": "rowwise",
    }

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = 12
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    sliding_window: int | None = None
    attention_bias: bool = False
    lm_head_bias: bool = False
    num_local_experts: int = 40
    num_experts_per_tok: int = 2
    router_type: str = "softmax_topk"
    router_renormalize: bool = False
    router_jitter_noise: float | int = 0.0
    input_jitter_noise: float | int = 0.0
    router_aux_loss_coef: float | int = 0.01
    moe_heads: int = 2
    use_head_projection: bool = True
    use_merge_projection: bool = True
    head_merge_bias: bool = True
    moe_layer_frequency: int = 2
    dense_intermediate_size: int = 2048
    shared_expert_intermediate_size: int = 0
    norm_type: str = "rmsnorm"
    mlp_bias: bool = False
    init_style: str = "normal"

    def __post_init__(self, **kwargs):
        validate_mh_moe_fields(self)
        super().__post_init__(**kwargs)

    def validate_moe_config(self) -> None:
        super().validate_moe_config()
        validate_mh_moe_fields(self)

    @property
    def sub_token_size(self) -> int:
        return self.hidden_size // self.moe_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.moe_layer_frequency > 0 and (layer_idx + 1) % self.moe_layer_frequency == 0

    def moe_layer_cost(self) -> "MoeLayerCost":
        """Per-token FLOPs and parameters of one MoE layer of this config (see `moe_layer_cost`)."""
        return moe_layer_cost(
            self.hidden_size,
            self.intermediate_size,
            self.num_local_experts,
            self.num_experts_per_tok,
            self.moe_heads,
            projections=int(self.use_head_projection) + int(self.use_merge_projection),
            shared_expert_size=self.shared_expert_intermediate_size,
        )


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs and parameter parity (paper b, section 2.2-2.3), counted for SwiGLU experts as the paper's configurations imply.


@dataclass(frozen=True)
class MoeLayerCost:
    """Per-token cost of one MoE layer: experts plus head/merge projections; the router is reported apart."""

    flops_per_token: int  # 2 x multiply-accumulates of the activated experts and the head/merge projections
    parameters: int  # all experts plus head/merge projections (weights only)
    active_parameters: int  # the most weights one token can touch (h sub-tokens x k experts each)
    router_parameters: int
    router_flops_per_token: int  # 2 x h sub-tokens x (d/h x E): d x E multiply-accumulates whatever h is routed


def moe_layer_cost(
    hidden_size: int,
    expert_size: int,
    num_experts: int,
    top_k: int,
    heads: int = 1,
    projections: int | None = None,
    shared_expert_size: int = 0,
) -> MoeLayerCost:
    """Cost of an MoE layer with SwiGLU experts (3 matrices each); MH-MoE when `heads > 1`.

    `projections` counts the d×d head/merge layers present: by default 2 when `heads > 1` (MH-MoE), else 0 (SMoE).
    Each of the `heads` sub-tokens activates `top_k` experts of input size `hidden_size / heads`, so the expert FLOPs
    do not depend on h. A shared expert runs on the whole token.
    """
    if hidden_size % heads:
        raise ValueError(f"`heads` ({heads}) must divide hidden_size ({hidden_size})")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"`top_k` must be in 1..num_experts (1..{num_experts}), got {top_k}")
    if projections is None:
        projections = 2 if heads > 1 else 0
    sub_token = hidden_size // heads
    expert_weights = 3 * sub_token * expert_size
    dense = projections * hidden_size * hidden_size + 3 * hidden_size * shared_expert_size
    return MoeLayerCost(
        flops_per_token=2 * (dense + heads * top_k * expert_weights),
        parameters=dense + num_experts * expert_weights,
        active_parameters=dense + min(num_experts, heads * top_k) * expert_weights,
        router_parameters=sub_token * num_experts,
        router_flops_per_token=2 * heads * sub_token * num_experts,
    )


@dataclass(frozen=True)
class ParityResult:
    expert_size: int  # FLOPs parity (SwiGLU-aware): d_mh * k = d_moe * k_s - (2/3) d  with head/merge
    exact_num_experts: float  # parameter parity, usually not an integer
    num_experts: int  # nearest multiple of `experts_multiple_of`
    baseline: MoeLayerCost
    mh_moe: MoeLayerCost

    @property
    def flops_ratio(self) -> float:
        return self.mh_moe.flops_per_token / self.baseline.flops_per_token

    @property
    def parameter_ratio(self) -> float:
        return self.mh_moe.parameters / self.baseline.parameters


def mh_moe_parity(
    hidden_size: int,
    baseline_expert_size: int,
    baseline_num_experts: int,
    baseline_top_k: int,
    heads: int,
    top_k: int,
    head_merge: bool = True,
    experts_multiple_of: int = 1,
) -> ParityResult:
    """Expert size and count for an MH-MoE layer at FLOPs parity (and nearest parameter parity) with a sparse MoE.

    FLOPs: 2d² (head+merge) + 3·k·d·d_mh = 3·k_s·d·d_moe, so d_mh = (k_s·d_moe − 2d/3) / k.
    Parameters: 2d² + E·3·(d/h)·d_mh = E_s·3·d·d_moe, solved for E and rounded to a multiple of `experts_multiple_of`
    (the paper's counts look rounded to multiples of 8: 40 for h=2, 96 for h=3).
    """
    baseline = moe_layer_cost(hidden_size, baseline_expert_size, baseline_num_experts, baseline_top_k)
    projections = 2 if head_merge else 0
    numerator = 3 * baseline_top_k * hidden_size * baseline_expert_size - projections * hidden_size * hidden_size
    if numerator <= 0 or numerator % (3 * top_k * hidden_size):
        raise ValueError(
            "no integer expert size gives FLOPs parity for these settings "
            f"(3·k_s·d·d_moe − 2d² = {numerator} is not a positive multiple of 3·k·d = {3 * top_k * hidden_size})"
        )
    expert_size = numerator // (3 * top_k * hidden_size)
    expert_weights = 3 * (hidden_size // heads) * expert_size
    exact = (baseline.parameters - projections * hidden_size * hidden_size) / expert_weights
    num_experts = max(top_k, experts_multiple_of * round(exact / experts_multiple_of))
    return ParityResult(
        expert_size=expert_size,
        exact_num_experts=exact,
        num_experts=num_experts,
        baseline=baseline,
        mh_moe=moe_layer_cost(hidden_size, expert_size, num_experts, top_k, heads, projections),
    )


__all__ = ["MhMoeConfig", "MoeLayerCost", "ParityResult", "moe_layer_cost", "mh_moe_parity"]
