"""CUDA checks, skipped where no GPU is present (CI). On a GPU machine: `python -m pytest -q tests/test_gpu.py`."""

import copy

import pytest
import torch
from conftest import rewrite_as_phimoe, tiny_model
from transformers import PhimoeForCausalLM
from transformers.models.phimoe import modeling_phimoe

from modeling_grin.sparsemixer import sparsemixer_v2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# bf16 against fp32, on the same (bf16-valued) weights, so only the arithmetic differs. bf16 keeps 8 significant bits
# (unit roundoff 2**-8 ~ 0.4 %); through a few layers, with fp32 accumulation in the GEMMs, a token's logits move by
# about one unit roundoff of their scale (CPU measurement over 6 seeds: median 0.3 %, 90th percentile <= 0.42 %).
# Rounding can also flip a near-tie of the router (a discontinuity: a top-k choice changes, or a SparseMixer weight
# jumps as the candidate set changes), which moves the tokens concerned, and through attention their successors, by
# more (CPU: at most 4.3 %). So: 90 % of the tokens within 1 % of the logits' scale (2.5 unit roundoffs), every
# token within 10 %, and the loss within 1 %.
BF16_TOKEN_TOLERANCE, BF16_TOKEN_SHARE, BF16_TOKEN_MAX, BF16_LOSS_TOLERANCE = 0.01, 0.9, 0.1, 0.01
# Gradients: bf16 backward rounds every intermediate too, and a flipped top-k choice changes which expert a token's
# gradient reaches (CPU measurement over 6 seeds of both tests: cosine to fp32 >= 0.989, norms within 3.4 %). Each
# parameter's gradient must point the same way (cosine >= 0.97, ~2.7x the worst 1 - cosine seen) with a norm within
# 15 %. Router weights of SparseMixer-v2 are left out: in eval their gradient is the masked softmax's, non-zero only
# for the near-tied tokens whose candidate set rounding changes, so it is not a smooth function of the rounding
# (CPU: relative error 170 %); the softmax top-k router (MH-MoE's preset) is compared.
BF16_GRAD_COSINE, BF16_GRAD_NORM = 0.97, 0.15


def bf16_and_fp32_reference(model):
    """The model in bf16, and the same bf16-valued weights in fp32 with the eager attention and experts."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16).eval()
    reference = copy.deepcopy(bf16).float().eval()
    reference.set_attn_implementation("eager")
    reference.set_experts_implementation("eager")
    return bf16, reference


def assert_bf16_matches_fp32(model, input_ids, smooth_router: bool) -> None:
    """Logits, loss and every parameter's gradient of `model` in bf16 against the fp32 eager reference (eval mode)."""
    bf16, reference = bf16_and_fp32_reference(model)
    outputs, gradients = [], []
    for network in (bf16, reference):
        network.zero_grad()
        out = network(input_ids, labels=input_ids)
        out.loss.backward()
        outputs.append(out)
        gradients.append({name: p.grad.float() for name, p in network.named_parameters() if p.grad is not None})
    (low, high), scale = outputs, outputs[1].logits.abs().max()
    assert low.logits.dtype == torch.bfloat16
    token_error = (low.logits.float() - high.logits).abs().amax(-1).flatten() / scale
    share = (token_error <= BF16_TOKEN_TOLERANCE).float().mean().item()
    assert share >= BF16_TOKEN_SHARE, f"only {share:.0%} of the tokens within {BF16_TOKEN_TOLERANCE:.1%}"
    assert token_error.max() <= BF16_TOKEN_MAX, f"a token is off by {token_error.max():.1%}"
    assert abs(low.loss.item() - high.loss.item()) <= BF16_LOSS_TOLERANCE * high.loss.item()
    assert gradients[0].keys() == gradients[1].keys() == {name for name, _ in model.named_parameters()}
    for name, expected in gradients[1].items():
        if "router" in name and not smooth_router:
            continue
        got = gradients[0][name]
        assert torch.isfinite(got).all(), name
        cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0).item()
        assert cosine >= BF16_GRAD_COSINE, f"{name}: cosine {cosine:.4f}"
        assert abs(got.norm() / expected.norm() - 1) <= BF16_GRAD_NORM, name


def assert_trains(model, input_ids) -> None:
    """One training-mode step (sampled routing, jitter, aux loss): every parameter gets a finite, non-zero gradient."""
    model.train().zero_grad()
    model(input_ids, labels=input_ids, output_router_logits=True).loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_sparsemixer_on_cuda_matches_the_reference_and_cpu():
    logits = (torch.randn(4096, 16) * 4).round() / 4
    cuda_logits = logits.cuda()
    weights, indices = sparsemixer_v2(cuda_logits, 2, 0.01, training=False)
    reference = modeling_phimoe.sparsemixer(cuda_logits, 0.01, training=False)
    assert torch.equal(weights, reference[0]) and torch.equal(indices, reference[1])
    cpu = sparsemixer_v2(logits, 2, 0.01, training=False)
    assert torch.equal(indices.cpu(), cpu[1]) and torch.allclose(weights.cpu(), cpu[0], atol=1e-6)

    generator = torch.Generator(device="cuda").manual_seed(0)
    sampled = sparsemixer_v2(cuda_logits.requires_grad_(True), 4, 0.01, True, generator=generator)
    sampled[0].sum().backward()
    assert torch.isfinite(cuda_logits.grad).all()


def test_model_on_cuda_matches_phimoe_fp32_and_runs_in_bf16(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model()
    model.save_pretrained(tmp_path)
    rewrite_as_phimoe(tmp_path)
    phimoe = PhimoeForCausalLM.from_pretrained(tmp_path).eval().cuda()
    model = model.cuda()
    input_ids = torch.randint(1, 96, (4, 33), device="cuda")
    with torch.no_grad():
        assert (model(input_ids).logits - phimoe(input_ids).logits).abs().max() <= 1e-5
        settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(model.generate(input_ids, **settings), phimoe.generate(input_ids, **settings))
    assert_bf16_matches_fp32(model, input_ids, smooth_router=False)
    assert_trains(bf16_and_fp32_reference(model)[0], input_ids)


def test_non_finite_logits_on_cuda_stop_the_program():
    """On CUDA the check is a device-side assert (no host sync per layer); it kills the CUDA context: run it apart."""
    import subprocess
    import sys

    script = (
        "import torch; from modeling_grin.sparsemixer import sparsemixer_v2\n"
        "logits = torch.randn(8, 4, device='cuda'); logits[3, 1] = float('nan')\n"
        "sparsemixer_v2(logits, 2, 0.01, training=True); torch.cuda.synchronize()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "assert" in result.stderr.lower()


def test_mh_moe_on_cuda_eager_and_grouped_mm_agree_and_train_in_bf16():
    from modeling_grin import MhMoeForCausalLM
    from modeling_grin.presets import load_preset

    torch.manual_seed(0)
    model = MhMoeForCausalLM(load_preset("mh-moe-tiny", shared_expert_intermediate_size=64)).cuda().eval()
    input_ids = torch.randint(1, 2048, (4, 64), device="cuda")
    with torch.no_grad():
        eager = model(input_ids).logits
        model.set_experts_implementation("grouped_mm")
        grouped = model(input_ids).logits
    assert (eager - grouped).abs().max() <= 1e-4
    # bf16 with grouped_mm experts against the fp32 eager reference (the preset routes by softmax top-k: smooth)
    assert_bf16_matches_fp32(model, input_ids, smooth_router=True)
    assert_trains(bf16_and_fp32_reference(model)[0], input_ids)
