"""BitNet b1.58 (arXiv 2402.17764) quantization-aware training for both families, the 3-D experts included.

With `config.bitnet=True` the attention projections, the dense FFNs and every expert compute with ternary weights
and int8 activations; embeddings, norms, routers, the lm_head and MH-MoE's head and merge layers stay in full
precision, as in the official MH-MoE code's `QuantizeLinear` (docs/bitnet.md).

- Weights: absmean, W~ = clamp(round(W / mean|W|), -1, 1) * mean|W| with the mean clamped at 1e-5; one scale per
  matrix: per linear layer, and per expert and per matrix for the experts (gate, up and down each their own, as the
  official code's one `FeedForwardNetwork` per expert has).
- Activations: absmax per row (token, or MH-MoE sub-token) to int8, x~ = clamp(round(x * 127 / max|x|), -128, 127)
  * max|x| / 127 with the max clamped at 1e-5: the input of every quantized matrix, so for the experts both the expert
  input and the SwiGLU output before `down_proj`.
- Straight-through gradients: the backward of both quantizers is the identity, so the latent full-precision weights
  get the gradient of the ternary ones and the optimizer updates them; the scales get none.

The formulas and the order of their floating-point operations are those of transformers' `WeightQuant`/`ActQuant`
(tested bit for bit), computed in fp32. Those are torch.compile'd and per tensor: on the CPU they compile for seconds
per new shape, and they cannot give each expert of a 3-D parameter its own scale.
"""

import torch
from torch import nn

SCALE_EPS = 1e-5  # both reference codes clamp the mean / max at this value rather than adding an epsilon
INT8_MAX = 127


def _by_matrix(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """`[..., rows, cols]` -> `[matrices, groups, rows / groups, cols]`: one row of scales per leading index."""
    return weight.reshape(-1, groups, weight.shape[-2] // groups, weight.shape[-1])


def ternary_codes(weight: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (codes in {-1, 0, 1} in fp32, shaped like `weight`; the inverse scales 1 / mean|W| `[matrices, groups]`).

    A 2-D weight is one matrix; a 3-D one `[E, rows, cols]` is E matrices, each split into `groups` blocks of rows
    with a scale each (`groups=2` for `gate_up_proj`: its gate rows, then its up rows)."""
    matrices = _by_matrix(weight.detach().float(), groups)
    inverse_scale = 1.0 / matrices.abs().mean(dim=(-2, -1), keepdim=True).clamp_(min=SCALE_EPS)
    codes = (matrices * inverse_scale).round_().clamp_(-1, 1)
    return codes.reshape(weight.shape), inverse_scale.reshape(inverse_scale.shape[:2])


def dequantize_ternary(codes: torch.Tensor, inverse_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes / inverse scale in `dtype`: the weight every quantized forward multiplies with."""
    groups = inverse_scale.shape[1]
    values = _by_matrix(codes.float(), groups) / inverse_scale[:, :, None, None]
    return values.reshape(codes.shape).to(dtype)


def int8_activations(hidden_states: torch.Tensor) -> torch.Tensor:
    """Absmax per row (the last dimension) to the int8 grid, returned dequantized in the input's dtype (no autograd:
    for code that writes its own backward)."""
    values = hidden_states.float()
    scale = INT8_MAX / values.abs().amax(dim=-1, keepdim=True).clamp_(min=SCALE_EPS)
    return ((values * scale).round_().clamp_(-INT8_MAX - 1, INT8_MAX) / scale).to(hidden_states.dtype)


class _TernaryWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, groups: int) -> torch.Tensor:
        return dequantize_ternary(*ternary_codes(weight, groups), weight.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


class _Int8Activations(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states: torch.Tensor) -> torch.Tensor:
        return int8_activations(hidden_states)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


def ternary_weight(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The ternary weight of the b1.58 forward, its gradient passed straight through to the latent `weight`."""
    return _TernaryWeight.apply(weight, groups)


def quantize_activations(hidden_states: torch.Tensor) -> torch.Tensor:
    """`int8_activations` with the gradient passed straight through."""
    return _Int8Activations.apply(hidden_states)


class BitNetLinear(nn.Linear):
    """An `nn.Linear` trained as BitNet b1.58: int8 input, ternary weight, full-precision bias. The parameters and
    their state-dict keys are nn.Linear's (the latent weight), so checkpoints, LoRA and initialisation treat it as
    one."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(quantize_activations(input), ternary_weight(self.weight), self.bias)

    @torch.no_grad()
    def packed_state(self) -> dict[str, torch.Tensor]:
        """The quantized weight as `PackedTernaryLinear` holds it: `weight_codes`, `weight_inverse_scale`."""
        return packed_weight_state("weight", self.weight)


def linear_class(config) -> type[nn.Linear]:
    """The class of the layers BitNet quantizes (attention projections, dense FFNs) under `config`."""
    return BitNetLinear if getattr(config, "bitnet", False) else nn.Linear


# ----- packed ternary weights (2 bits each), for export and inference ------------------------------------------------

# transformers' packing (`integrations/bitnet.py`): codes + 1 in 2 bits, 4 per uint8, packed along dim 0 in blocks.
# Our matrices are packed along their rows (dim -2), so that a 3-D expert tensor packs each expert separately.


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """codes `[..., rows, cols]` in {-1, 0, 1} -> uint8 `[..., ceil(rows / 4), cols]`."""
    from transformers.integrations.bitnet import pack_weights

    packed = pack_weights(codes.movedim(-2, 0).to(torch.int8).clone())  # (it adds 1 in place: a copy)
    return packed.movedim(0, -2).contiguous()


def unpack_ternary(packed: torch.Tensor, rows: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of `pack_ternary`, for a matrix of `rows` rows (the padding slots decode as -1: cut off).

    transformers' `unpack_weights` with the same layout (tested equal) is torch.compile'd: on this CPU 5.7 s for its
    first call and 55 ms per call for 16 experts of [800, 256] codes, against 7 ms for these shifts in eager mode."""
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=packed.device).view(4, 1, 1)
    codes = (packed.unsqueeze(-3) >> shifts) & 3  # [..., 4, R, cols]: block i holds rows i R .. (i + 1) R - 1
    codes = codes.reshape(*packed.shape[:-2], 4 * packed.shape[-2], packed.shape[-1])[..., :rows, :]
    return codes.to(dtype) - 1


def packed_weight_state(name: str, weight: torch.Tensor, groups: int = 1) -> dict[str, torch.Tensor]:
    """`{name}_codes` (the packed codes) and `{name}_inverse_scale` of a latent weight: what inference keeps."""
    codes, inverse_scale = ternary_codes(weight, groups)
    return {f"{name}_codes": pack_ternary(codes), f"{name}_inverse_scale": inverse_scale}


class PackedTernaryLinear(nn.Module):
    """A `BitNetLinear` for inference from its packed codes: `weight_codes` (uint8, 4 codes per byte) and
    `weight_inverse_scale` (1 / mean|W|, fp32, transformers' `BitLinear` convention) give the exact weight of the
    training forward, so the outputs are the same bits."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_codes", torch.zeros((out_features + 3) // 4, in_features, dtype=torch.uint8))
        self.register_buffer("weight_inverse_scale", torch.ones(1, 1))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_bitnet(cls, linear: BitNetLinear) -> "PackedTernaryLinear":
        packed = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=linear.weight.dtype)
        packed.load_state_dict({**linear.packed_state(), **({"bias": linear.bias} if linear.bias is not None else {})})
        return packed

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        codes = unpack_ternary(self.weight_codes, self.out_features)
        weight = dequantize_ternary(codes, self.weight_inverse_scale, input.dtype)
        return nn.functional.linear(int8_activations(input), weight, self.bias)
