"""The Triton experts kernels against the eager experts: compiled on CUDA, else through Triton's CPU interpreter."""

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

pytest.importorskip("triton")

from modeling_grin.modeling_grin_moe import GrinMoeExperts  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODULE = "modeling_grin.triton_experts"


# Triton's interpreter must be chosen before `triton` is first imported (its own tl.zeros, tl.sum, ... are
# @triton.jit functions made at that import), and importing modeling_grin or torch._dynamo already imports triton.
# So without CUDA the kernel tests run in a child pytest started with TRITON_INTERPRET=1 (see the last test).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
IN_PROCESS = torch.cuda.is_available() or INTERPRETED


@pytest.fixture(scope="module")
def kernels():
    if not IN_PROCESS:
        pytest.skip("no CUDA: run under TRITON_INTERPRET=1 by test_kernels_under_the_cpu_interpreter")
    module = importlib.import_module(MODULE)
    assert module.triton_available()
    return module


def make_experts(num_experts=4, top_k=2, seed=0, dtype=torch.float32):
    config = tiny_config(num_local_experts=num_experts, num_experts_per_tok=top_k)  # H = 32, I = 24
    torch.manual_seed(seed)
    experts = GrinMoeExperts(config)
    for parameter in experts.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    experts.config._experts_implementation = "eager"
    return experts.to(DEVICE, dtype)


def random_routing(tokens, num_experts, top_k, seed=0):
    generator = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(tokens)])
    return index.reshape(tokens, top_k).to(DEVICE), torch.rand(tokens, top_k, generator=generator).to(DEVICE)


def forward_and_grads(experts, function, hidden, index, weights):
    """Output and gradients w.r.t. hidden states, routing weights and both expert weights for a fixed upstream."""
    hidden = hidden.detach().clone().requires_grad_(True)
    weights = weights.detach().clone().requires_grad_(True)
    output = function(hidden, index, weights)
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(1)).to(output)
    parameters = (hidden, weights, experts.gate_up_proj, experts.down_proj)
    grads = torch.autograd.grad((output * upstream).sum(), parameters)
    names = ("hidden", "routing weights", "gate_up_proj", "down_proj")
    return {"output": output.detach(), **dict(zip(names, grads, strict=True))}


def triton_function(kernels, experts, **options):
    def function(hidden, index, weights):
        return kernels.triton_swiglu_experts(hidden, weights, index, experts.gate_up_proj, experts.down_proj, **options)

    return function


def relative_errors(experts, kernels, hidden, index, weights, **options):
    reference = forward_and_grads(experts, experts, hidden, index, weights)
    result = forward_and_grads(experts, triton_function(kernels, experts, **options), hidden, index, weights)
    errors = {}
    for name, expected in reference.items():
        scale = expected.float().abs().max().clamp(min=1e-6)
        errors[name] = ((result[name].float() - expected.float()).abs().max() / scale).item()
    return errors, result


def small_blocks(kernels):
    """16-wide tiles: several column blocks, several reduction steps and ragged edges (I = 24) at the tiny sizes."""
    return kernels.BlockSizes(rows=16, cols=16, inner=16)


# Top-k 1 to 4 and a single token; "small" tiles give several column blocks and reduction steps with ragged edges.
@pytest.mark.parametrize(
    "tokens, top_k, tiles", [(1, 1, "default"), (1, 4, "small"), (13, 2, "small"), (13, 3, "default")]
)
def test_forward_and_every_gradient_match_eager(kernels, tokens, top_k, tiles):
    experts = make_experts(top_k=top_k)
    index, weights = random_routing(tokens, 4, top_k, seed=tokens)
    hidden = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    blocks = small_blocks(kernels) if tiles == "small" else None
    errors, _ = relative_errors(experts, kernels, hidden, index, weights, block_sizes=blocks)
    assert max(errors.values()) <= 1e-5, errors


def test_default_blocks_and_int32_indices(kernels):
    experts = make_experts()
    index, weights = random_routing(16, 4, 2)
    hidden = torch.randn(16, 32).to(DEVICE)
    errors, _ = relative_errors(experts, kernels, hidden, index.to(torch.int32), weights)
    assert max(errors.values()) <= 1e-5, errors


def test_all_tokens_to_one_expert_and_empty_experts(kernels):
    experts = make_experts()
    hidden = torch.randn(16, 32).to(DEVICE)
    one_expert = torch.full((16, 1), 2, device=DEVICE)  # one expert takes every row: several row blocks of 8
    errors, result = relative_errors(
        experts, kernels, hidden, one_expert, torch.rand(16, 1).to(DEVICE), block_sizes=kernels.BlockSizes(8, 16, 16)
    )
    assert max(errors.values()) <= 1e-5, errors
    assert result["gate_up_proj"][[0, 1, 3]].abs().sum() == 0 and result["down_proj"][[0, 1, 3]].abs().sum() == 0

    two_experts = torch.tensor([[3, 1]] * 16, device=DEVICE)  # experts 0 and 2 get nothing
    errors, _ = relative_errors(experts, kernels, hidden, two_experts, torch.rand(16, 2).to(DEVICE))
    assert max(errors.values()) <= 1e-5, errors


def test_expert_parallel_sentinels_are_skipped(kernels):
    """Ids >= E (transformers' expert parallelism: the expert is on another rank) get no compute and zero output,
    as in the eager loop over this rank's experts; their routing weights get a zero gradient."""
    experts = make_experts(top_k=2)
    index, weights = random_routing(13, 4, 2, seed=4)
    index[::3, 0] = 4
    index[1::4, 1] = 7
    errors, result = relative_errors(experts, kernels, torch.randn(13, 32).to(DEVICE), index, weights)
    assert max(errors.values()) <= 1e-5, errors
    assert (result["routing weights"][index >= 4] == 0).all()
    every_pair = torch.full((3, 2), 4, device=DEVICE)
    output = kernels.triton_swiglu_experts(
        torch.randn(3, 32, device=DEVICE), torch.rand(3, 2, device=DEVICE), every_pair,
        experts.gate_up_proj, experts.down_proj,
    )  # fmt: skip
    assert (output == 0).all()


def test_runs_are_bit_identical(kernels):
    experts = make_experts(top_k=3)
    index, weights = random_routing(16, 4, 3)
    hidden = torch.randn(16, 32).to(DEVICE)
    function = triton_function(kernels, experts)
    first = forward_and_grads(experts, function, hidden, index, weights)
    second = forward_and_grads(experts, function, hidden, index, weights)
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


def test_inference_path_equals_training_path(kernels):
    experts = make_experts()
    index, weights = random_routing(9, 4, 2)
    hidden = torch.randn(9, 32).to(DEVICE)
    with torch.no_grad():
        inference = kernels.triton_swiglu_experts(hidden, weights, index, experts.gate_up_proj, experts.down_proj)
    training = kernels.triton_swiglu_experts(hidden, weights, index, experts.gate_up_proj, experts.down_proj)
    assert training.requires_grad and not inference.requires_grad
    assert torch.equal(inference, training.detach())


def test_empty_batch_and_bad_arguments(kernels):
    experts = make_experts()
    hidden = torch.randn(0, 32, device=DEVICE)
    output = kernels.triton_swiglu_experts(
        hidden, torch.empty(0, 2, device=DEVICE), torch.empty(0, 2, dtype=torch.long, device=DEVICE),
        experts.gate_up_proj, experts.down_proj,
    )  # fmt: skip
    assert output.shape == (0, 32) and output.abs().sum() == 0
    index, weights = random_routing(3, 4, 2)
    with pytest.raises(ValueError, match="SiLU"):
        kernels.triton_swiglu_experts(
            torch.randn(3, 32, device=DEVICE), weights, index, experts.gate_up_proj, experts.down_proj,
            activation="gelu",
        )  # fmt: skip
    with pytest.raises(ValueError, match="shapes"):
        kernels.triton_swiglu_experts(
            torch.randn(3, 16, device=DEVICE), weights, index, experts.gate_up_proj, experts.down_proj
        )


# Half-precision operands, fp32 accumulation; the interpreter runs fp16 dots but has no bf16, so bf16 runs on CUDA only.
@pytest.mark.parametrize(
    "dtype, tokens, tolerance",
    [
        (torch.float16, 16, 1e-2),
        pytest.param(torch.bfloat16, 64, 3e-2, marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="Triton's interpreter has no bf16; bf16 runs on CUDA only")),
    ],
)  # fmt: skip
def test_half_precision_is_close_to_fp32(kernels, dtype, tokens, tolerance):
    experts = make_experts()
    index, weights = random_routing(tokens, 4, 2)
    hidden = torch.randn(tokens, 32).to(DEVICE)
    reference = forward_and_grads(experts, experts, hidden, index, weights)
    half = make_experts(dtype=dtype)
    result = forward_and_grads(half, triton_function(kernels, half), hidden.to(dtype), index, weights)
    for name, expected in reference.items():
        assert result[name].dtype == (torch.float32 if name == "routing weights" else dtype), name
        error = (result[name].float() - expected).abs().max() / expected.abs().max()
        assert error < tolerance, (name, error)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a CUDA device")
def test_cuda_default_blocks_at_a_larger_size(kernels):
    config = tiny_config(num_local_experts=8, hidden_size=256, intermediate_size=320)
    torch.manual_seed(0)
    experts = GrinMoeExperts(config)
    for parameter in experts.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    experts.config._experts_implementation = "eager"
    experts = experts.to(DEVICE)
    index, weights = random_routing(700, 8, 2)
    errors, _ = relative_errors(experts, kernels, torch.randn(700, 256).to(DEVICE), index, weights)
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.skipif(IN_PROCESS, reason="the kernels run in this process")
def test_kernels_under_the_cpu_interpreter():
    """Runs this file again in a child pytest with TRITON_INTERPRET=1 set before anything imports triton."""
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent)
    report = child.stdout[-6000:] + child.stderr[-2000:]
    assert child.returncode == 0, report
    assert " passed" in child.stdout.strip().splitlines()[-1], report


def fresh_copy():
    """A separate copy of the kernels module, leaving the imported one alone: under its own name, so that it registers
    its own custom operators instead of replacing the imported module's (as a remote-code copy would)."""
    spec = importlib.util.spec_from_file_location("triton_experts_copy", importlib.util.find_spec(MODULE).origin)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.OPERATOR_NAMESPACE == "triton_experts_copy"
    return module


@pytest.mark.skipif(INTERPRETED, reason="needs a process whose triton was imported without the interpreter")
def test_interpreter_requested_after_triton_was_imported_is_not_used(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    module = fresh_copy()  # its kernels are interpreted, Triton's own tl.zeros is not: they cannot run on the CPU
    assert not module._INTERPRETED
    assert module.triton_available() == torch.cuda.is_available()


def test_module_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    module = fresh_copy()
    assert not module.triton_available()
    with pytest.raises(RuntimeError, match="needs triton"):
        module.triton_swiglu_experts(torch.randn(2, 4), torch.rand(2, 1), torch.zeros(2, 1, dtype=torch.long),
                                     torch.randn(1, 6, 4), torch.randn(1, 4, 3))  # fmt: skip


@pytest.mark.skipif(INTERPRETED, reason="interpreted kernels are not compiled")
@pytest.mark.skipif(os.environ.get("GRIN_TRITON_AOT") != "1", reason="opt-in (about a minute): GRIN_TRITON_AOT=1")
@pytest.mark.parametrize("dtype, precision", [("fp32", "ieee"), ("bf16", "tf32")])
def test_every_kernel_compiles_for_hopper_without_a_gpu(dtype, precision):
    """Compiles (to a cubin, with the ptxas bundled with Triton) each kernel configuration the host code launches, for
    sm_90: the compiled-mode front end is checked on machines without CUDA too."""
    import triton
    from triton.backends.compiler import GPUTarget

    module = importlib.import_module(MODULE)
    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": 4, "num_stages": 3}).__dict__
    blocks = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "PRECISION": precision}
    rows = {"block_expert_ptr": "*i32", "block_start_ptr": "*i32", "block_end_ptr": "*i32", "order_ptr": "*i32"}
    rows |= {"token_ptr": "*i32", "scale_ptr": "*fp32", "grad_scale_ptr": "*fp32", "expert_offsets_ptr": "*i32"}
    launches = [
        (module._gate_up_swiglu_kernel, {"SAVE_GATE_UP": True}),
        (module._gate_up_swiglu_kernel, {"SAVE_GATE_UP": False}),
        (module._rows_to_pairs_kernel, {"SCALE": True}),
        (module._rows_to_pairs_kernel, {"SCALE": False}),
        (module._down_swiglu_backward_kernel, {"STORE_H": True}),
        (module._expert_xty_kernel, {"X_GATHER": True, "X_SCALE": True, "Y_GATHER": False}),
        (module._expert_xty_kernel, {"X_GATHER": False, "X_SCALE": False, "Y_GATHER": True}),
    ]
    for kernel, flags in launches:
        constexprs = {**blocks, **flags}
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = rows.get(name, "*" + dtype)
            else:
                signature[name] = "i32"
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        assert triton.compile(source, target=target, options=options).asm["cubin"], kernel.__name__


@pytest.mark.parametrize("family", ["grin", "mh-moe"])
def test_fused_flag_runs_the_kernels_inside_whole_models(kernels, monkeypatch, family):
    """`experts_implementation="fused"` dispatches here (CUDA, or the interpreter) and trains like eager."""
    from conftest import tiny_model
    from test_mh_moe import tiny_mh_model

    import modeling_grin.fused_experts as fused_experts

    calls = []
    original = kernels.triton_swiglu_experts
    monkeypatch.setattr(fused_experts, "triton_swiglu_experts", lambda *args: calls.append(1) or original(*args))
    build = tiny_model if family == "grin" else tiny_mh_model
    input_ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = []
    for implementation in ("eager", "fused"):
        model = build(router_type="softmax_topk", input_jitter_noise=0.0, router_jitter_noise=0.0).to(DEVICE).train()
        model.set_experts_implementation(implementation)
        output = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
        output.loss.backward()
        results.append([output.logits.detach(), *(p.grad for p in model.parameters() if p.grad is not None)])
    assert calls, "the fused flag did not reach the Triton kernels"
    for fused, eager in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)


def test_custom_operators_pass_opcheck(kernels):
    """Schema, fake implementations, autograd registration and AOT tracing of the kernels' two custom operators."""
    experts = make_experts()
    index, weights = random_routing(9, 4, 2)
    index[0, 1] = 4  # a sentinel too
    blocks = [16, 16, 16, 4, 3]
    hidden = torch.randn(9, 32).to(DEVICE).requires_grad_(True)
    arguments = (hidden, weights.requires_grad_(True), index, experts.gate_up_proj, experts.down_proj, blocks, True)
    torch.library.opcheck(kernels._swiglu_experts, arguments)
    output, gate_up = kernels._swiglu_experts(*arguments)
    backward_arguments = (torch.randn_like(output), hidden.detach(), weights.detach(), index,
                          experts.gate_up_proj.detach(), experts.down_proj.detach(), gate_up.detach(), blocks,
                          [True, True, False, True])  # fmt: skip
    torch.library.opcheck(kernels._swiglu_experts_backward, backward_arguments)


def test_models_with_the_kernels_compile_into_one_graph(kernels):
    """torch.compile(fullgraph=True) of a model whose `fused` experts run the kernels: eager's logits and gradients."""
    from conftest import tiny_model

    model = tiny_model(num_hidden_layers=1).to(DEVICE)  # (one layer: tracing under the interpreter is the cost)
    model.set_experts_implementation("fused")
    input_ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = []
    for runner in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad()
        output = runner(input_ids=input_ids, labels=input_ids)
        output.loss.backward()
        results.append([output.logits.detach(), *(p.grad.clone() for p in model.parameters())])
    torch._dynamo.reset()
    for compiled, eager in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
