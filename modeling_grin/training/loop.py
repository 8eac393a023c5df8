"""`grin-moe train`: train either family from a preset, config or checkpoint, alone or under `accelerate launch`.

One loop for every launch mode: Accelerate supplies the process group, DDP / FSDP2 / DeepSpeed wrapping, mixed
precision and gradient accumulation; this module supplies the data, the schedule, checkpoints that resume anywhere and
the plots. Batches are drawn from a generator seeded by (seed, step), so a run resumed from a checkpoint, or the same
global batch split over N processes, sees exactly the rows an uninterrupted single-process run would.
"""

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, set_seed

from ..data import embedded_corpus, load_texts, token_blocks, train_tokenizer
from ..hub import write_model_card
from ..modeling_grin_moe import mark_moe_blocks_as_zero3_leaves
from ..presets import load_preset
from .checkpoints import (
    CHECKPOINT_PREFIX,
    OPTIMIZER_STATE,
    OPTIMIZER_TENSORS,
    STATE_FILE,
    check_resume_point,
    complete_checkpoints,
    find_resume_point,
    replace_folder,
    require_writable_folder,
    run_fingerprint,
    state_record,
)
from .evaluation import evaluate, save_expert_load_heatmap, save_loss_curve


@dataclass
class TrainResult:
    """What `train` returns: the figures (also written to `train_summary.json`) and, for callers that want to probe
    it, the prepared model (DDP/FSDP-wrapped under a distributed launch) and its accelerator."""

    summary: dict
    model: torch.nn.Module = field(repr=False)
    accelerator: Accelerator = field(repr=False)


def _enable_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Accelerate turns an FSDP launch config into FSDP only on accelerators; on CPU it silently falls back to DDP.
    FSDP2 itself runs on CPU over gloo, so when the launch asked for FSDP, switch the shared state to it."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables `accelerate launch` exported
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on CPU needs fsdp_version: 2 in the accelerate config")
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin


def _uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def _uses_zero3(accelerator: Accelerator) -> bool:
    return _uses_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def learning_rate_at(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to `peak`, then cosine decay to zero at `total_steps`."""
    warmup = min(1.0, (step + 1) / max(1, warmup_steps))
    return peak * warmup * 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0)))


def global_batch_indices(seed: int, step: int, num_rows: int, global_batch: int) -> torch.Tensor:
    """The rows of step `step`: the same for any number of processes and after any resume."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(num_rows, (global_batch,), generator=generator)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The `checkpoint-N/` folder with the largest N holding a training state (not checked for damage)."""
    return next(iter(complete_checkpoints(Path(output_dir))), None)


def _flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A full optimizer state dict as safetensors tensors plus JSON (no pickle anywhere in a checkpoint)."""
    tensors, scalars = {}, {}
    for name, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}::{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[str, dict] = {}
    for flat, value in [*tensors.items(), *rest["scalars"].items()]:
        name, key = flat.rsplit("::", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _save_folder(accelerator: Accelerator, model, tokenizer, folder: Path) -> None:
    """The full model (gathered from every rank under FSDP/ZeRO-3) and tokenizer, written by the main process into
    a temporary folder and renamed, so an interrupted save never leaves a folder that looks complete."""
    if _uses_deepspeed(accelerator):
        state_dict = accelerator.get_state_dict(model)  # ZeRO-3 gathers through the engine
    else:  # one call for a plain, DDP or FSDP2 model; full tensors land on rank 0 only
        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if accelerator.is_main_process:
        temporary = folder.with_name(f".{folder.name}.saving")
        shutil.rmtree(temporary, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(temporary, state_dict=state_dict)
        tokenizer.save_pretrained(temporary)
        replace_folder(temporary, folder)  # keeps files in `folder` that train did not write
    accelerator.wait_for_everyone()


def _save_checkpoint(accelerator, model, optimizer, tokenizer, folder: Path, step: int, losses: list[float],
                     fingerprint: dict) -> None:
    optimizer_state = get_optimizer_state_dict(
        model, optimizer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    _save_folder(accelerator, model, tokenizer, folder)
    if accelerator.is_main_process:
        tensors, rest = _flatten_optimizer_state(optimizer_state)
        save_file(tensors, folder / OPTIMIZER_TENSORS)
        (folder / OPTIMIZER_STATE).write_text(json.dumps(rest))
        # Last: marks the folder complete, with the sizes of the files above (a truncated one is caught on resume).
        (folder / STATE_FILE).write_text(json.dumps(state_record(folder, step, losses, fingerprint)))
    accelerator.wait_for_everyone()


def _load_config(path: str | Path, what: str):
    """A config file or folder; a type or range error in it becomes one `ValueError` line naming the file."""
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, StrictDataclassError) as error:
        raise ValueError(f"{what} {path}: {' '.join(str(error).split())}") from None


def _source_config(model, config, preset):
    """The config the run starts from: the fine-tuned model's, else `config` (a copy: training sets fields on it),
    else the preset's."""
    if model is not None:
        return _load_config(model, "model")
    if isinstance(config, PretrainedConfig):
        return copy.deepcopy(config)
    if config is not None:
        return _load_config(config, "config")
    return load_preset(preset)


def _validate(steps, batch_size, gradient_accumulation_steps, block_size, learning_rate, save_steps, eval_fraction):
    for name, value in (("steps", steps), ("batch_size", batch_size), ("block_size", block_size),
                        ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    if not learning_rate > 0:
        raise ValueError(f"`learning_rate` must be positive, got {learning_rate}")
    if save_steps < 0:
        raise ValueError(f"`save_steps` must be 0 (only the final model) or positive, got {save_steps}")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"`eval_fraction` must be in (0, 1), got {eval_fraction}")


def train(
    output_dir: str | Path,
    preset: str | None = "grin-moe-tiny",
    config: str | Path | PretrainedConfig | None = None,
    model: str | Path | None = None,
    data: list[str | Path] | None = None,
    text_field: str = "text",
    tokenizer: str | Path | None = None,
    vocab_size: int = 2048,
    steps: int = 200,
    batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    block_size: int = 128,
    learning_rate: float = 3e-3,
    warmup_steps: int = 20,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    save_steps: int = 0,
    resume: bool = False,
    experts_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    mixed_precision: str | None = None,
    eval_fraction: float = 0.05,
    save_dir: str | Path | None = None,
    on_before_optimizer_step: Callable[[int, torch.nn.Module], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a causal LM of either family and save a Hub-ready folder in `output_dir`.

    The model comes from `model` (a saved folder: fine-tuning), else `config` (a config object, a config.json or a
    folder), else `preset`.
    The text comes from `data` (text files, `.jsonl` files, folders of them) or, when `data` is None, the embedded
    corpus. The tokenizer is `tokenizer`, else the one saved with `model`, else a byte-level BPE trained on the data.
    `batch_size` is per process and per micro-step: the global batch is batch_size × processes ×
    gradient_accumulation_steps sequences of `block_size` tokens. Every `save_steps` steps a resumable checkpoint
    (`checkpoint-STEP/`: a loadable model folder plus optimizer state in safetensors) is written; `resume=True`
    continues from the latest one. The final model goes to `save_dir` (default `output_dir/model`), replacing it.
    `on_before_optimizer_step(step, model)` sees synchronized gradients. `progress=False` hides the progress bar.
    Bad input raises before any training starts: missing or empty data, block_size above the model's positions,
    output folders that cannot be written, and on resume a checkpoint of another run (its fingerprint: model config,
    tokenizer, data) or one that already reached `steps`. A damaged newest checkpoint is skipped with a warning.
    """
    _validate(steps, batch_size, gradient_accumulation_steps, block_size, learning_rate, save_steps, eval_fraction)
    started = time.perf_counter()
    output_dir = Path(output_dir)
    save_dir = Path(save_dir) if save_dir is not None else output_dir / "model"
    if save_steps and save_dir.resolve() == output_dir.resolve():
        raise ValueError("`save_dir` must differ from `output_dir` when checkpoints are written into it")
    require_writable_folder(output_dir, "--output-dir")
    require_writable_folder(save_dir, "the model folder")
    # Without an accelerator Accelerate would run each launched process alone; cpu=True makes it join them over gloo.
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        cpu=not torch.accelerator.is_available(),
    )
    _enable_fsdp_on_cpu(accelerator)
    warn = accelerator.is_main_process
    resume_point = find_resume_point(output_dir, warn=warn) if resume else None
    checkpoint = resume_point.folder if resume_point is not None else None
    if checkpoint is not None and _uses_deepspeed(accelerator):
        raise ValueError("resuming is supported for single-process, DDP and FSDP2 runs, not under DeepSpeed")

    for name, path in (("model", model), ("config", config), ("tokenizer", tokenizer)):
        if isinstance(path, (str, Path)) and not Path(path).exists():
            raise FileNotFoundError(f"{name} path {path} does not exist")
    source_config = _source_config(model, config, preset)
    if source_config.model_type not in ("grinmoe", "mh_moe"):
        raise ValueError(f"model_type {source_config.model_type!r} is not one of this package's (grinmoe, mh_moe)")
    if block_size > source_config.max_position_embeddings:
        raise ValueError(
            f"`block_size` ({block_size}) exceeds the model's max_position_embeddings "
            f"({source_config.max_position_embeddings})"
        )
    texts = load_texts(data, text_field) if data else embedded_corpus()
    model_has_tokenizer = model is not None and (Path(model) / "tokenizer.json").is_file()
    given_tokenizer = tokenizer or (model if model_has_tokenizer else None)
    fingerprint = run_fingerprint(source_config, given_tokenizer, vocab_size, texts)
    if resume_point is not None:
        check_resume_point(resume_point, fingerprint, steps, warn=warn)
        model_config = _load_config(checkpoint, "checkpoint")
    else:
        model_config = source_config
    tokenizer_source = checkpoint or given_tokenizer
    if tokenizer_source is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    else:  # deterministic: every rank trains the same one; the local main process shows progress on long text
        tokenizer = train_tokenizer(texts, vocab_size=vocab_size,
                                    show_progress=None if accelerator.is_local_main_process else False)

    if checkpoint is None and model is None:  # a fresh model is sized for the tokenizer, all fields at once
        model_config.update({"vocab_size": len(tokenizer), **{
            name: getattr(tokenizer, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")
        }})
    if len(tokenizer) > model_config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model_config.vocab_size}")
    model_config.output_router_logits = True  # the aux loss trains the router

    blocks = token_blocks(tokenizer, texts, block_size)
    world = accelerator.num_processes
    num_heldout = max(1, int(len(blocks) * eval_fraction))  # independent of the process count: same training rows
    if len(blocks) - num_heldout < 1:
        raise ValueError(f"the dataset gives {len(blocks)} blocks of {block_size} tokens: too few to hold out "
                         f"{num_heldout} for evaluation and train on the rest")
    train_blocks, heldout_blocks = blocks[:-num_heldout], blocks[-num_heldout:]

    set_seed(seed)
    if checkpoint is not None or model is not None:
        network = AutoModelForCausalLM.from_pretrained(checkpoint or model, config=model_config)
    else:
        network = AutoModelForCausalLM.from_config(model_config)
    if _uses_zero3(accelerator):
        mark_moe_blocks_as_zero3_leaves(network)  # Accelerate without zero3_init does not tell transformers
    if experts_implementation is not None:
        network.set_experts_implementation(experts_implementation)
    if gradient_checkpointing:
        network.activation_checkpointing_enable()
    network.train()
    num_parameters = sum(parameter.numel() for parameter in network.parameters())  # before sharding
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=weight_decay)
    network, optimizer = accelerator.prepare(network, optimizer)

    start_step, losses = 0, []
    if resume_point is not None:
        start_step, losses = resume_point.step, list(resume_point.losses)
        optimizer_state = _unflatten_optimizer_state(
            load_file(checkpoint / OPTIMIZER_TENSORS), json.loads((checkpoint / OPTIMIZER_STATE).read_text())
        )
        set_optimizer_state_dict(
            network, optimizer.optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True)
        )

    family = "MH-MoE" if model_config.model_type == "mh_moe" else "GRIN-MoE"
    global_batch = batch_size * world * gradient_accumulation_steps
    progress = tqdm(range(start_step, steps), initial=start_step, total=steps, desc=f"training {family}", unit="step",
                    disable=not (progress and accelerator.is_local_main_process))
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, learning_rate, warmup_steps, steps)
        # Routing noise (SparseMixer-v2 sampling, jitter) is drawn from a seed per (step, rank): a resumed run
        # continues exactly as the uninterrupted one would have.
        torch.manual_seed(seed * 1_000_003 + step * 1_009 + accelerator.process_index)
        rows = global_batch_indices(seed, step, len(train_blocks), global_batch).view(
            gradient_accumulation_steps, world, batch_size
        )
        step_loss = 0.0
        for micro_step in range(gradient_accumulation_steps):
            batch = train_blocks[rows[micro_step, accelerator.process_index]].to(accelerator.device)
            with accelerator.accumulate(network):
                loss = network(input_ids=batch, labels=batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if max_grad_norm > 0:
                        accelerator.clip_grad_norm_(network.parameters(), max_grad_norm)
                    if on_before_optimizer_step is not None:
                        on_before_optimizer_step(step, network)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += accelerator.reduce(loss.detach(), "mean").item() / gradient_accumulation_steps
        losses.append(step_loss)
        progress.set_postfix(loss=f"{step_loss:.3f}")
        if save_steps and (step + 1) % save_steps == 0 and step + 1 < steps:
            folder = output_dir / f"{CHECKPOINT_PREFIX}{step + 1}"
            _save_checkpoint(accelerator, network, optimizer, tokenizer, folder, step + 1, losses, fingerprint)

    # Every rank evaluates an equal share (FSDP/ZeRO-3 forwards are collective; a remainder of fewer than `world`
    # blocks is left out, a shortage wraps around), outside DDP's wrapper.
    per_rank = max(1, num_heldout // world)
    shard_rows = (torch.arange(per_rank) + accelerator.process_index * per_rank) % num_heldout
    shard = heldout_blocks[shard_rows].to(accelerator.device)
    evaluated = accelerator.unwrap_model(network)
    heldout_loss, load = evaluate(evaluated, shard, batch_size)
    heldout_loss = accelerator.reduce(torch.tensor(heldout_loss, device=accelerator.device), "mean").item()
    load = accelerator.reduce(load, "mean").cpu()
    accelerator.unwrap_model(network).config.output_router_logits = False
    _save_folder(accelerator, network, tokenizer, save_dir)
    accelerator.unwrap_model(network).config.output_router_logits = True

    summary = {
        "output_dir": str(save_dir),
        "parameters": num_parameters,
        "train_blocks": len(train_blocks),
        "heldout_blocks": len(heldout_blocks),
        "family": family,
        "processes": world,
        "distributed_type": "FSDP2" if isinstance(network, FSDPModule) else accelerator.distributed_type.value,
        "global_batch": global_batch,
        "tokens_seen": (steps - start_step) * global_batch * block_size,
        "resumed_from_step": start_step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "heldout_loss": heldout_loss,
        "heldout_perplexity": math.exp(heldout_loss),
        "max_expert_load_over_uniform": (load.max() * load.shape[1]).item(),
        "seconds": time.perf_counter() - started,
    }
    if accelerator.is_main_process:
        folder = save_dir
        if losses:
            save_loss_curve(losses, folder / "loss_curve.png", f"{family} training")
        save_expert_load_heatmap(load, folder / "expert_load.png", f"{family}: expert load on held-out text")
        write_model_card(
            folder,
            training_details={
                "data": ", ".join(map(str, data)) if data else "Python standard-library sources (embedded)",
                "steps": steps,
                "global batch": f"{global_batch} × {block_size} tokens ({world} process(es))",
                "optimizer": f"AdamW, lr {learning_rate}, warmup {warmup_steps} steps, cosine decay",
                "seed": seed,
                "loss curve": "![loss curve](loss_curve.png)",
            },
            eval_results={"loss": heldout_loss, "perplexity": math.exp(heldout_loss)},
            eval_dataset="held-out blocks of the training data",
        )
        (output_dir / "train_summary.json").write_text(json.dumps({**summary, "losses": losses}, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return TrainResult(summary=summary, model=network, accelerator=accelerator)
