"""GRIN-MoE: a pre-LayerNorm decoder with GQA + sliding-window attention and SparseMixer-v2-routed SwiGLU experts.

The same architecture as Phi-3.5-MoE and transformers' `PhimoeForCausalLM`; with the same weights the logits agree.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb, eager_attention_forward
from transformers.models.phimoe.modeling_phimoe import PhimoeRotaryEmbedding
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .bitnet import linear_class
from .configuration_grin_moe import GrinMoeConfig
from .experts import EXPERTS_FUNCTIONS, SwiGLUExperts, bitnet_experts
from .losses import gshard_load_balancing_loss, load_balancing_loss, router_z_loss
from .sparsemixer import GrinMoeRouter

logger = logging.get_logger(__name__)

# The released checkpoint stores `block_sparse_moe.gate` and one module per expert (`experts.N.w1/w2/w3`). These
# converters fuse them into our 3-D experts at load time, and `save_pretrained` applies them in reverse, so the Hub
# layout round-trips. Registered here, in the modeling file, so that remote-code loading registers it too.
# Each renaming maps released keys straight to ours, and no pattern of one matches what another produces, in either
# direction: every matching renaming fires in turn (on save in reverse order), so overlapping ones would chain.
register_checkpoint_conversion_mapping(
    "grinmoe",
    [
        WeightRenaming(".block_sparse_moe.gate.weight", ".mlp.router.weight"),
        WeightRenaming(".block_sparse_moe.experts.", ".mlp.experts."),
        WeightConverter(
            source_patterns=[".experts.*.w1.weight", ".experts.*.w3.weight"],
            target_patterns=".experts.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        WeightConverter(
            source_patterns=".experts.*.w2.weight",
            target_patterns=".experts.down_proj",
            operations=[MergeModulelist(dim=0)],
        ),
    ],
    overwrite=True,
)


class GrinMoeAttention(nn.Module):
    """Grouped-query attention with q/k/v/o biases, RoPE and an optional sliding window."""

    def __init__(self, config: GrinMoeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim  # the config sets it (hidden_size // num_attention_heads unless given)
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias, linear = config.attention_bias, linear_class(config)  # BitNetLinear under config.bitnet
        self.q_proj = linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.config.sliding_window,  # mask-free kernels (flash attention) take it as an argument
            **kwargs,
        )
        _check_attention_output(attn_output, (query_states, key_states, value_states), self.config, self.layer_idx)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


def _check_attention_output(output: torch.Tensor, inputs: tuple[torch.Tensor, ...], config, layer_idx: int) -> None:
    """Name the attention implementation when it turns finite inputs into NaN/inf (flex_attention on CPU can, for
    short inputs): otherwise the first MoE router reports the NaN as diverged training. CPU only, where the check
    costs no synchronisation; inputs are inspected only once the output is bad."""
    if output.device.type != "cpu" or torch.compiler.is_compiling() or torch.isfinite(output).all():
        return
    if all(torch.isfinite(tensor).all() for tensor in inputs):
        raise ValueError(
            f"attention implementation {config._attn_implementation!r} returned NaN or inf in layer {layer_idx} for "
            "finite queries, keys and values; use another one, e.g. attn_implementation='sdpa' or 'eager'"
        )


@bitnet_experts
@use_experts_implementation(experts_interface=EXPERTS_FUNCTIONS)
class GrinMoeExperts(SwiGLUExperts):
    """GRIN's SwiGLU experts; `experts_implementation` picks eager (the inherited forward), grouped_mm or batched_mm."""


class GrinMoeSparseMoeBlock(nn.Module):
    """Router + experts, dropless: every token reaches its `num_experts_per_tok` experts.

    `input_size` defaults to `hidden_size`; MH-MoE's block reuses this one on sub-tokens of that size.
    """

    experts_class = GrinMoeExperts

    def __init__(self, config: GrinMoeConfig, input_size: int | None = None):
        super().__init__()
        self.input_jitter_noise = config.input_jitter_noise
        self.router = GrinMoeRouter(config, input_size)
        self.experts = self.experts_class(config, input_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training and self.input_jitter_noise > 0:
            # GRIN multiplies the MoE input (seen by router and experts) by U(1 - eps, 1 + eps), once.
            eps = self.input_jitter_noise
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - eps, 1.0 + eps)
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, routing_weights, selected_experts = self.router(tokens)
        return self.experts(tokens, selected_experts, routing_weights).reshape(hidden_states.shape)


def build_norm(config) -> nn.Module:
    """GRIN's LayerNorm with bias (eps from `rms_norm_eps`), or RMSNorm when `norm_type="rmsnorm"`."""
    if config.norm_type == "rmsnorm":
        return LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)


class GrinMoeDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h)); `mlp` is the MoE block (or, in MH-MoE, a dense FFN)."""

    def __init__(self, config: GrinMoeConfig, layer_idx: int):
        super().__init__()
        self.self_attn = GrinMoeAttention(config, layer_idx)
        self.mlp = self.build_mlp(config, layer_idx)
        self.input_layernorm = build_norm(config)
        self.post_attention_layernorm = build_norm(config)

    def build_mlp(self, config: GrinMoeConfig, layer_idx: int) -> nn.Module:
        return GrinMoeSparseMoeBlock(config)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def micro_batch_share(labels: torch.Tensor, num_items_in_batch) -> torch.Tensor | float:
    """This micro-batch's share of the label tokens of the whole accumulated batch (1 outside accumulation).

    Under gradient accumulation transformers' Trainer passes `num_items_in_batch` and does not average the micro-batch
    losses: the LM loss is normalised by it, and the aux loss must be weighted by this share, or N accumulation steps
    give N times the aux gradient of one N-times-larger batch (transformers' own MoE models have that bug).
    """
    if num_items_in_batch is None:
        return 1.0
    return (labels[..., 1:] != -100).sum() / num_items_in_batch


def mark_moe_blocks_as_zero3_leaves(model: nn.Module) -> None:
    """Make DeepSpeed ZeRO-3 gather each MoE block's parameters as one unit.

    ZeRO-3 fetches parameters module by module as the forward pass reaches them and prefetches by the order it traced;
    inside a MoE block which experts run depends on the data, so per-module fetching inside it stalls or desyncs ranks.
    """
    block_classes = list({type(module) for module in model.modules() if isinstance(module, GrinMoeSparseMoeBlock)})
    if block_classes:
        try:  # optional dependency: inside try, so remote-code loading does not list deepspeed as required
            from deepspeed.utils import set_z3_leaf_modules
        except ImportError as error:
            raise ImportError("DeepSpeed ZeRO-3 is active but deepspeed cannot be imported") from error
        set_z3_leaf_modules(model, block_classes)


class GrinMoePreTrainedModel(PreTrainedModel):
    config: GrinMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GrinMoeDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # generation with a static cache compiles with fullgraph=True (tests/test_generation.py): the host-side checks
    # step aside under compilation and the experts' data-dependent routing stays inside custom operators
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(GrinMoeRouter, index=0),
        "hidden_states": GrinMoeDecoderLayer,
        "attentions": GrinMoeAttention,
    }

    def post_init(self):
        super().post_init()
        if is_deepspeed_zero3_enabled():  # Trainer (or HfDeepSpeedConfig) with a ZeRO-3 config
            mark_moe_blocks_as_zero3_leaves(self)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, SwiGLUExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, GrinMoeRouter):
            init.normal_(module.weight, mean=0.0, std=std)


class GrinMoeModel(GrinMoePreTrainedModel):
    decoder_layer_class = GrinMoeDecoderLayer

    def __init__(self, config: GrinMoeConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [self.decoder_layer_class(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = build_norm(config)
        # Default RoPE, or Phi-3.5-MoE's longrope with its short/long attention scales.
        self.rotary_emb = PhimoeRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        new_tokens = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if new_tokens == 0:  # RoPE and the masks would fail on it with an unrelated RuntimeError
            shape = tuple((input_ids if input_ids is not None else inputs_embeds).shape)
            raise ValueError(f"the input holds no tokens (shape {shape}): a forward needs at least one position")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        past_seen_tokens = cache.get_seq_length() if cache is not None else 0
        _warn_beyond_trained_positions(self.config, new_tokens, past_seen_tokens)
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        mask_function = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        causal_mask = mask_function(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


def _warn_beyond_trained_positions(config, new_tokens: int, past_tokens) -> None:
    """Warn once, as transformers' models do, when a sequence outgrows `max_position_embeddings`."""
    # A static cache may count its length in a tensor: reading it would synchronise with the GPU, so it is skipped.
    if not isinstance(past_tokens, int) or torch.compiler.is_compiling():
        return
    if new_tokens + past_tokens > config.max_position_embeddings:
        logger.warning_once(
            f"This sequence is longer than max_position_embeddings ({config.max_position_embeddings}): the model was "
            "not trained on those positions and its outputs past them may be meaningless"
        )


class GrinMoeForCausalLM(GrinMoePreTrainedModel, GenerationMixin):
    model_class = GrinMoeModel
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: GrinMoeConfig):
        super().__init__(config)
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Token ids for the language-modeling loss (shifted inside); -100 marks ignored positions.
        output_router_logits (`bool`, *optional*):
            Return every MoE layer's router logits and add `router_aux_loss_coef` times the load-balancing loss to
            the language-modeling loss.
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        aux_loss = None
        if output_router_logits:
            # Router rows cover only this call's tokens; with a cache the 2-D mask also covers the past ones.
            token_mask = None
            if attention_mask is not None and attention_mask.dim() == 2:
                token_mask = attention_mask[:, -outputs.last_hidden_state.shape[1] :]
            if self.config.aux_loss_type == "gshard":
                aux_loss = gshard_load_balancing_loss(outputs.router_logits, self.config.num_local_experts, token_mask)
            else:
                aux_loss = load_balancing_loss(
                    outputs.router_logits, self.config.num_local_experts, self.config.num_experts_per_tok, token_mask,
                    global_balance=self.config.load_balancing == "global",
                )
            if loss is not None and aux_loss is not None:
                share = micro_batch_share(labels, kwargs.get("num_items_in_batch"))
                router_loss = self.config.router_aux_loss_coef * aux_loss
                if self.config.router_z_loss_coef > 0:
                    router_loss = router_loss + self.config.router_z_loss_coef * router_z_loss(
                        outputs.router_logits, token_mask
                    )
                loss = loss + share * router_loss.to(loss.device)

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def prepare_inputs_for_generation(
        self,
        input_ids,
        cache=None,
        attention_mask=None,
        inputs_embeds=None,
        position_ids=None,
        use_cache=True,
        logits_to_keep=0,
        **kwargs,
    ):
        # longrope switches from the short to the long factors once the sequence outgrows the original context;
        # keys cached under the short factors are then stale, so the cache is dropped and the prompt re-encoded.
        rope = self.config.rope_parameters or {}
        if (
            cache
            and rope.get("rope_type") == "longrope"
            and input_ids.shape[1] > rope["original_max_position_embeddings"] >= cache.get_seq_length()
        ):
            cache = None
            kwargs["next_sequence_length"] = None
        return super().prepare_inputs_for_generation(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


class GrinMoeForSequenceClassification(GenericForSequenceClassification, GrinMoePreTrainedModel):
    model_class = GrinMoeModel

    def __init__(self, config: GrinMoeConfig):
        # Build the backbone directly instead of through AutoModel, so this class also works as exported remote code.
        PreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = self.model_class(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()


__all__ = [
    "GrinMoePreTrainedModel",
    "GrinMoeModel",
    "GrinMoeForCausalLM",
    "GrinMoeForSequenceClassification",
]
