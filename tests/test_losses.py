import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import free_port, tiny_model
from safetensors.torch import load_file, save_file

from modeling_grin.losses import load_balancing_loss, router_z_loss


def test_global_balance_over_two_processes_equals_one_process_on_the_concatenated_batch(tmp_path):
    generator = torch.Generator().manual_seed(0)
    batch, length = 4, 5  # rows are batch * length tokens; each rank gets two sequences
    data = {f"layer{i}": torch.randn(batch * length, 6, generator=generator) for i in range(2)}
    data["mask"] = torch.ones(batch, length)
    data["mask"][1, :2] = 0
    data["mask"][2, :3] = 0
    save_file(data, tmp_path / "input.safetensors")
    worker = Path(__file__).parent / "distributed" / "aux_loss_worker.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(worker), str(tmp_path / "input.safetensors"),
               str(tmp_path / "out")]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=root, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = load_file(tmp_path / "out")

    logits = [data[f"layer{i}"].clone().requires_grad_(True) for i in range(2)]
    single = load_balancing_loss(tuple(logits), 6, 2, data["mask"])
    single.backward()
    assert torch.allclose(distributed["loss"], single.detach(), rtol=1e-5, atol=0)
    for i in range(2):
        assert torch.allclose(distributed[f"grad{i}"], logits[i].grad, rtol=1e-5, atol=1e-9)


def test_global_balance_without_a_process_group_is_the_local_loss():
    logits = (torch.randn(12, 6),)
    assert torch.equal(load_balancing_loss(logits, 6, 2, global_balance=True), load_balancing_loss(logits, 6, 2))


def test_router_z_loss_and_its_config_weight():
    logits = torch.randn(10, 6)
    mask = torch.ones(2, 5)
    mask[0, :2] = 0
    expected = (logits.logsumexp(-1).square() * mask.reshape(-1)).sum() / mask.sum()
    assert torch.allclose(router_z_loss((logits,), mask), expected)

    input_ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    plain = tiny_model()(input_ids, labels=input_ids, output_router_logits=True)
    with_z = tiny_model(router_z_loss_coef=0.1)(input_ids, labels=input_ids, output_router_logits=True)
    z = router_z_loss(with_z.router_logits)
    assert torch.allclose(with_z.loss, plain.loss + 0.1 * z)


def test_the_models_router_z_loss_leaves_out_padding():
    input_ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding
    attention_mask[1, 5:] = 0  # right padding
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    arguments = dict(attention_mask=attention_mask, labels=labels, output_router_logits=True)
    plain = tiny_model()(input_ids, **arguments)
    with_z = tiny_model(router_z_loss_coef=0.1)(input_ids, **arguments)
    # Independently: the mean over the non-padding rows only, from the router logits and the formula.
    rows = attention_mask.reshape(-1).bool()
    masked_z = torch.cat([logits[rows].logsumexp(-1).square() for logits in with_z.router_logits]).mean()
    unmasked_z = torch.cat([logits.logsumexp(-1).square() for logits in with_z.router_logits]).mean()
    assert not torch.allclose(0.1 * masked_z, 0.1 * unmasked_z, rtol=0, atol=1e-4)  # padding would show
    assert torch.allclose(with_z.loss, plain.loss + 0.1 * masked_z, rtol=0, atol=1e-5)
    # The aux loss leaves the padding out too (this part of the loss is shared by both models).
    masked_rows = tuple(logits[rows] for logits in with_z.router_logits)
    assert torch.allclose(with_z.aux_loss, load_balancing_loss(masked_rows, 4, 2), rtol=0, atol=1e-6)


def switch_loss_from_the_formula(layers, num_experts, top_k, mask=None):
    """E * sum_i f_i * P_i over the concatenated non-padding rows of every layer, written out independently."""
    rows = torch.cat(layers)
    keep = torch.ones(rows.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1).bool().repeat(len(layers))
    probs = rows[keep].softmax(-1)
    routed = torch.nn.functional.one_hot(probs.topk(top_k, -1).indices, num_experts).sum(1).float()
    return num_experts * (routed.mean(0) * probs.mean(0)).sum()


def test_load_balancing_loss_is_the_switch_formula_over_layers_and_non_padding_rows():
    # Mutation testing (docs/testing.md): the local loss's value and gradient against the formula, with a mask.
    generator = torch.Generator().manual_seed(0)
    layers = [(3 * torch.randn(10, 6, generator=generator)).requires_grad_(True) for _ in range(2)]
    mask = torch.ones(2, 5)
    mask[0, :2] = 0
    loss = load_balancing_loss(tuple(layers), 6, 2, mask)
    expected = switch_loss_from_the_formula(layers, 6, 2, mask)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)
    assert not torch.allclose(loss, switch_loss_from_the_formula(layers, 6, 2), rtol=1e-3, atol=0)  # mask matters
    grads = torch.autograd.grad(loss, layers)
    expected_grads = torch.autograd.grad(expected, layers)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert grad.abs().sum() > 0
        assert torch.allclose(grad, expected_grad, rtol=1e-5, atol=1e-8)
    assert load_balancing_loss(None, 6, 2) is None and load_balancing_loss((), 6, 2) is None
    assert router_z_loss(None) is None and router_z_loss(()) is None
