"""transformers' Trainer with gradient accumulation: the aux loss is scaled like one larger batch."""

import pytest
import torch
from conftest import tiny_model
from test_mh_moe import tiny_mh_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from modeling_grin.sparsemixer import GrinMoeRouter


class RouterGradient(TrainerCallback):
    def __init__(self):
        self.gradients = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        routers = [module for module in model.modules() if isinstance(module, GrinMoeRouter)]
        self.gradients.append(torch.cat([router.weight.grad.flatten() for router in routers]))


def router_gradient_after_one_step(
    tmp_path, batch_size, accumulation, examples, build=tiny_model, experts_implementation=None,
    gradient_checkpointing=False,
):
    # Deterministic training forward (softmax top-k, no jitter) so that the two runs see the same computation.
    model = build(router_type="softmax_topk", input_jitter_noise=0.0, router_jitter_noise=0.0,
                  router_aux_loss_coef=1.0, output_router_logits=True).train()
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    callback = RouterGradient()
    arguments = TrainingArguments(
        output_dir=str(tmp_path / f"run-{batch_size}-{accumulation}-{experts_implementation}"),
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, max_steps=1,
        learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        dataloader_drop_last=True, seed=0, activation_checkpointing=gradient_checkpointing,
    )
    Trainer(model=model, args=arguments, train_dataset=examples, callbacks=[callback]).train()
    return callback.gradients[0]


def test_gradient_accumulation_matches_one_larger_batch(tmp_path):
    # Identical micro-batches make the expert-load statistics of each micro-batch equal to the whole batch's,
    # so the one-large-batch gradient is the exact reference for the accumulated one.
    row = torch.randint(1, 96, (12,), generator=torch.Generator().manual_seed(0))
    examples = [{"input_ids": row, "labels": row} for _ in range(4)]
    one_batch = router_gradient_after_one_step(tmp_path, 4, 1, examples)
    accumulated = router_gradient_after_one_step(tmp_path, 1, 4, examples)
    assert one_batch.abs().max() > 0
    relative = (accumulated - one_batch).abs().max() / one_batch.abs().max()
    assert relative <= 1e-5, f"router gradient differs by {relative:.2e} (N-times-too-strong aux loss?)"


@pytest.mark.parametrize("build", [tiny_model, tiny_mh_model], ids=["grin", "mh-moe"])
def test_fused_experts_with_gradient_checkpointing_train_like_eager(tmp_path, build):
    row = torch.randint(1, 64, (12,), generator=torch.Generator().manual_seed(0))  # both tiny vocabularies
    examples = [{"input_ids": row.roll(i), "labels": row.roll(i)} for i in range(4)]
    eager = router_gradient_after_one_step(tmp_path, 2, 2, examples, build, "eager")
    fused = router_gradient_after_one_step(tmp_path, 2, 2, examples, build, "fused", gradient_checkpointing=True)
    assert eager.abs().max() > 0
    assert (fused - eager).abs().max() / eager.abs().max() <= 1e-5


def test_router_logits_stay_out_of_predictions(tmp_path):
    model = tiny_model(output_router_logits=True)
    row = torch.randint(1, 96, (10,), generator=torch.Generator().manual_seed(1))
    arguments = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[], use_cpu=True)
    prediction = Trainer(model=model, args=arguments).predict([{"input_ids": row, "labels": row}] * 2)
    predictions = prediction.predictions
    assert not isinstance(predictions, tuple) or len(predictions) == 1
    assert (predictions[0] if isinstance(predictions, tuple) else predictions).shape == (2, 10, 96)


@pytest.mark.parametrize("num_items, expected", [(None, 1.0), (44, 11 / 44)])
def test_micro_batch_share(num_items, expected):
    from modeling_grin.modeling_grin_moe import micro_batch_share

    labels = torch.ones(1, 12, dtype=torch.long)
    assert float(micro_batch_share(labels, num_items)) == pytest.approx(expected)


def test_router_statistics_reach_the_trainer_logs(tmp_path):
    from modeling_grin.training import add_router_statistics

    model = tiny_model(output_router_logits=True).train()
    rows = [{"input_ids": r, "labels": r} for r in torch.randint(1, 96, (8, 12), generator=torch.Generator())]
    arguments = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                                  logging_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=arguments, train_dataset=rows)
    callback = add_router_statistics(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "router/entropy" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert 1.0 <= entry["router/mean_max_load_ratio"] <= entry["router/max_load_ratio"] <= 4.0
        assert 0.0 < entry["router/entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
        assert {"router/layer_0/max_load_ratio", "router/layer_1/max_load_ratio"} <= entry.keys()
    model(rows[0]["input_ids"][None])  # after training the hooks are gone: nothing more is recorded
    assert callback.statistics() == {}
