"""CUDA checks, skipped where no GPU is present (CI). On a GPU machine: `python -m pytest -q tests/test_gpu.py`."""

import pytest
import torch
from conftest import rewrite_as_phimoe, tiny_model
from transformers import PhimoeForCausalLM
from transformers.models.phimoe import modeling_phimoe

from modeling_grin.sparsemixer import sparsemixer_v2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
        fp32 = model(input_ids).logits
        bf16 = model.to(torch.bfloat16)(input_ids).logits.float()
    assert (bf16 - fp32).abs().max() / fp32.abs().max() < 0.05
    model.train()
    model(input_ids, labels=input_ids, output_router_logits=True).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


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
    model = model.to(torch.bfloat16).train()
    model(input_ids, labels=input_ids, output_router_logits=True).loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
