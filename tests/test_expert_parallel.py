"""transformers' expert parallelism (DistributedConfig(ep_size=2)) on two CPU processes: both model families, with the
`fused` experts, give the single-process logits, loss and gradients."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, tiny_model
from safetensors.torch import load_file, save_file
from test_mh_moe import tiny_mh_model

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).parent / "distributed" / "expert_parallel_worker.py"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def single_process_reference(model, input_ids):
    output = model(input_ids, labels=input_ids)
    output.loss.backward()
    grads = {f"grad.{name}": parameter.grad for name, parameter in model.named_parameters()}
    return {"logits": output.logits.detach(), "loss": output.loss.detach(), **grads}


CASES = [("grin", "all_reduce"), ("grin", "all_to_all"), ("mh_moe", "all_reduce")]


@pytest.fixture(scope="module")
def expert_parallel_runs(tmp_path_factory):
    """Every case's single-process reference and the outputs of rank 0, from one two-process launch."""
    folder = tmp_path_factory.mktemp("expert_parallel")
    input_ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": input_ids}, folder / "inputs.safetensors")
    references, cases = {}, []
    for family, ep_implementation in CASES:
        model = tiny_model() if family == "grin" else tiny_mh_model(moe_layer_frequency=1)
        model.save_pretrained(folder / family)
        references[family, ep_implementation] = single_process_reference(model, input_ids)
        cases.append(f"{folder / family}:{ep_implementation}:{folder / f'{family}-{ep_implementation}.safetensors'}")

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", free_port(), WORKER, folder / "inputs.safetensors", "fused", *cases]  # fmt: skip
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return {
        case: (reference, load_file(folder / f"{case[0]}-{case[1]}.safetensors"))
        for case, reference in references.items()
    }


@pytest.mark.parametrize("family, ep_implementation", CASES)
def test_two_expert_parallel_processes_match_one(expert_parallel_runs, family, ep_implementation):
    reference, distributed = expert_parallel_runs[family, ep_implementation]
    assert distributed.keys() == reference.keys()
    for name, expected in reference.items():
        error = (distributed[name] - expected).abs().max() / expected.abs().max().clamp(min=1e-6)
        assert error <= 1e-5, (name, error.item())
