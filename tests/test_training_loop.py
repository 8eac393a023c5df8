import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modeling_grin.cli import main
from modeling_grin.presets import load_preset, presets_root
from modeling_grin.training.evaluation import evaluate
from modeling_grin.training.loop import latest_checkpoint, train

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).parent / "distributed" / "train_worker.py"


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    import textwrap

    path.write_text(Path(textwrap.__file__).read_text(encoding="utf-8"))
    return path


@pytest.fixture(scope="module")
def exact_routing_config(tmp_path_factory):
    """grin-moe-tiny without routing noise (no sampling, no jitter): one process and two must then agree exactly."""
    folder = tmp_path_factory.mktemp("config")
    config = load_preset(
        "grin-moe-tiny", router_type="softmax_topk", router_jitter_noise=0.0, input_jitter_noise=0.0,
        load_balancing="global", num_hidden_layers=2,
    )
    config.save_pretrained(folder)
    return folder / "config.json"


def run_worker(arguments, launcher, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, str(WORKER), *map(str, arguments)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, exact_routing_config, small_text):
    folder = tmp_path_factory.mktemp("single")
    run_worker([exact_routing_config, small_text, folder / "out", folder / "results", 4], [sys.executable], folder)
    return load_file(folder / "results")


@pytest.mark.parametrize("launch_config", ["ddp", "fsdp2"])
def test_two_processes_match_one_process_on_the_same_global_batch(
    launch_config, tmp_path, exact_routing_config, small_text, single_process_run
):
    port = str(free_port())
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(presets_root() / "accelerate" / f"{launch_config}.yaml"), "--num_processes", "2",
                "--main_process_port", port]
    run_worker([exact_routing_config, small_text, tmp_path / "out", tmp_path / "results", 2], launcher, tmp_path)
    distributed = load_file(tmp_path / "results")
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["distributed_type"] == ("FSDP2" if launch_config == "fsdp2" else "MULTI_CPU")
    assert summary["final_loss"] < summary["first_loss"]  # it trains

    torch.testing.assert_close(distributed["losses"][0], single_process_run["losses"][0], rtol=1e-5, atol=0)
    gradients = [name for name in single_process_run if name.startswith("grad/")]
    assert len(gradients) > 10 and set(gradients) == {name for name in distributed if name.startswith("grad/")}
    for name in gradients:
        torch.testing.assert_close(distributed[name], single_process_run[name], rtol=1e-5, atol=1e-7, msg=name)

    # The saved folder (full weights gathered from the shards) computes what the distributed model computed.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").eval()
    with torch.no_grad():
        logits = reloaded(input_ids=torch.arange(2 * 16).view(2, 16) % 300).logits
    torch.testing.assert_close(logits, distributed["probe_logits"], rtol=1e-5, atol=1e-6)
    assert latest_checkpoint(tmp_path / "out").name == "checkpoint-3"


def test_train_saves_a_hub_ready_folder_and_resumes_exactly(tmp_path, small_text):
    arguments = dict(data=[small_text], vocab_size=300, steps=4, batch_size=2, block_size=32, save_steps=2)
    uninterrupted = train(tmp_path / "a", **arguments)
    folder = tmp_path / "a" / "model"
    for name in ("model.safetensors", "tokenizer.json", "README.md", "loss_curve.png", "expert_load.png"):
        assert (folder / name).is_file(), name
    assert uninterrupted.summary["final_loss"] < uninterrupted.summary["first_loss"]
    assert AutoModelForCausalLM.from_pretrained(folder).config.output_router_logits is False

    # A run that crashed after its step-2 checkpoint, resumed: same losses, same final weights.
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed = train(tmp_path / "b", **arguments, resume=True)
    assert resumed.summary["resumed_from_step"] == 2
    losses = [json.loads((tmp_path / run / "train_summary.json").read_text())["losses"] for run in ("a", "b")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    weights = [load_file(tmp_path / run / "model" / "model.safetensors") for run in ("a", "b")]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def test_train_takes_a_config_object_as_it_takes_its_file(tmp_path, small_text, exact_routing_config, capsys):
    """The reproductions hand `train` config objects: the same run as from the saved config.json, the caller's object
    left as it was, and no progress bar when asked for none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(exact_routing_config)
    before = config.to_dict()
    arguments = dict(data=[small_text], vocab_size=300, steps=3, batch_size=2, block_size=32, progress=False)
    from_object = train(tmp_path / "object", config=config, **arguments)
    assert config.to_dict() == before  # train sets output_router_logits and the vocabulary on its own copy
    assert "training GRIN-MoE" not in capsys.readouterr().err
    from_file = train(tmp_path / "file", config=exact_routing_config, **arguments)
    losses = [json.loads((tmp_path / run / "train_summary.json").read_text())["losses"] for run in ("object", "file")]
    assert losses[0] == losses[1] and from_object.summary["heldout_loss"] == from_file.summary["heldout_loss"]


def test_train_command_fine_tunes_a_saved_model_on_jsonl(tmp_path, small_text, capsys):
    data = tmp_path / "data.jsonl"
    lines = small_text.read_text().split("\n\n")
    data.write_text("\n".join(json.dumps({"body": chunk}) for chunk in lines if chunk.strip()) + "\n")
    common = ["--data", str(data), "--text-field", "body", "--steps", "2", "--batch-size", "2", "--block-size", "32"]
    assert main(["train", "--output-dir", str(tmp_path / "base"), "--preset", "mh-moe-tiny", "--vocab-size", "300",
                 *common]) == 0
    assert main(["train", "--output-dir", str(tmp_path / "tuned"), "--model", str(tmp_path / "base" / "model"),
                 "--experts-implementation", "fused", "--gradient-checkpointing", *common]) == 0
    output = capsys.readouterr().out
    assert "MH-MoE" in output and "held-out loss" in output
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned" / "model")
    assert tuned.config.model_type == "mh_moe" and tuned.config.vocab_size == 300


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "does/not/exist.txt"], "does not exist"),
        (["--data", "EMPTY"], "holds no text"),
        (["--data", "TEXT", "--block-size", "4096"], "exceeds the model's max_position_embeddings"),
        (["--data", "TEXT", "--resume"], "holds no complete checkpoint"),
        (["--preset", "no-such-preset"], "unknown preset"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, small_text, capsys, extra, message):
    (tmp_path / "empty.txt").write_text("  \n")
    extra = [{"EMPTY": str(tmp_path / "empty.txt"), "TEXT": str(small_text)}.get(item, item) for item in extra]
    assert main(["train", "--output-dir", str(tmp_path / "out"), "--vocab-size", "300", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "model").exists()


def test_held_out_evaluation_is_the_lm_loss_and_the_expert_load_in_one_pass():
    model = tiny_model(router_aux_loss_coef=0.5, output_router_logits=True, num_local_experts=4).train()
    blocks = torch.randint(1, 96, (5, 11), generator=torch.Generator().manual_seed(0))
    loss, load = evaluate(model, blocks, batch_size=2)
    assert model.training  # left as it was found
    model.eval()
    with torch.no_grad():  # the model's own LM loss (router losses off), averaged over the three batches
        expected_loss = sum(model(batch, labels=batch, output_router_logits=False).loss.item()
                            for batch in blocks.split(2)) / 3
        router_logits = model(blocks, output_router_logits=True).router_logits
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    for layer, logits in enumerate(router_logits):
        counts = torch.bincount(logits.topk(2, dim=-1).indices.flatten(), minlength=4).float()
        assert torch.allclose(load[layer], counts / counts.sum())
    assert (load[0] > 0).sum() >= 2  # several experts take part
