"""Publishing helpers: make a saved model folder loadable where this package is not installed."""

import json
import shutil
from pathlib import Path

import torch

from .experts import SwiGLUExperts

_PACKAGE_DIR = Path(__file__).resolve().parent

# Everything a model needs at run time; these modules import each other only as flat siblings (`from .x import y`),
# which is what transformers' remote-code loader copies.
RUNTIME_MODULES = (
    "configuration_grin_moe.py",
    "configuration_mh_moe.py",
    "sparsemixer.py",
    "bitnet.py",
    "experts.py",
    "fused_experts.py",
    "triton_experts.py",
    "losses.py",
    "modeling_grin_moe.py",
    "modeling_mh_moe.py",
)

_AUTO_MAP = {
    "grinmoe": ("configuration_grin_moe.GrinMoeConfig", "modeling_grin_moe", "GrinMoe"),
    "mh_moe": ("configuration_mh_moe.MhMoeConfig", "modeling_mh_moe", "MhMoe"),
}


def export_remote_code(folder: str | Path) -> dict:
    """Copy the runtime modules into a saved model folder and point `auto_map` at them.

    Afterwards `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works on a machine with only
    transformers installed. Returns the `auto_map` written. The config is rewritten atomically.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: save the model there first")
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type")
    if model_type not in _AUTO_MAP:
        raise ValueError(f"model_type {model_type!r} is not one of this package's ({', '.join(_AUTO_MAP)})")

    for name in RUNTIME_MODULES:
        shutil.copyfile(_PACKAGE_DIR / name, folder / name)
    config_class, modeling_module, prefix = _AUTO_MAP[model_type]
    auto_map = {
        "AutoConfig": config_class,
        "AutoModel": f"{modeling_module}.{prefix}Model",
        "AutoModelForCausalLM": f"{modeling_module}.{prefix}ForCausalLM",
        "AutoModelForSequenceClassification": f"{modeling_module}.{prefix}ForSequenceClassification",
    }
    config["auto_map"] = auto_map
    temporary = config_path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    temporary.replace(config_path)
    return auto_map


# ---------------------------------------------------------------------------------------------------------------------
# Model cards


def parameter_counts(config) -> tuple[int, int]:
    """(total, active per token) parameters of the causal LM described by `config`, counted on the meta device.

    Active counts every dense weight plus, in each MoE layer, the experts one token can reach: top-k for GRIN-MoE,
    min(E, h·k) for MH-MoE's h sub-tokens.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(parameter.numel() for parameter in model.parameters())
    inactive = 0
    for module in model.modules():
        experts, router = getattr(module, "experts", None), getattr(module, "router", None)
        if isinstance(experts, SwiGLUExperts) and router is not None:
            per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // experts.num_experts
            reachable = min(experts.num_experts, getattr(module, "moe_heads", 1) * router.top_k)
            inactive += (experts.num_experts - reachable) * per_expert
    return total, total - inactive


def _billions(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def write_model_card(
    folder: str | Path,
    license: str = "mit",
    base_model: str | None = None,
    training_details: dict | None = None,
    eval_results: dict[str, float] | None = None,
    eval_dataset: str = "held-out text",
) -> Path:
    """Write `README.md` for a saved model folder: Hub metadata, architecture, routing, usage, training, results.

    `eval_results` maps a metric name (e.g. "perplexity") to its value and becomes the card's model-index. A figure
    `expert_load.png` in the folder is shown under routing. Returns the card's path; the file is written atomically.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():  # checked first: a missing folder must not be taken for a Hub id
        raise FileNotFoundError(f"{folder} has no config.json: save the model there first")
    config = AutoConfig.from_pretrained(folder)
    family = {"grinmoe": "grin-moe", "mh_moe": "mh-moe"}.get(config.model_type)
    if family is None:
        raise ValueError(f"model_type {config.model_type!r} is not one of this package's (grinmoe, mh_moe)")
    name = folder.resolve().name
    total, active = parameter_counts(config)
    heads = getattr(config, "moe_heads", 1)
    moe_layers = sum(
        1 for i in range(config.num_hidden_layers) if not hasattr(config, "is_moe_layer") or config.is_moe_layer(i)
    )
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        base_model=base_model,
        model_name=name,
        tags=["moe", "mixture-of-experts", family, config.router_type.replace("_", "-")],
        eval_results=[
            EvalResult(task_type="text-generation", dataset_type="text", dataset_name=eval_dataset,
                       metric_type=metric, metric_value=value)
            for metric, value in (eval_results or {}).items()
        ] or None,
    )
    routing = (
        f"SparseMixer-v2 (GRIN-MoE's gradient-informed router), top-{config.num_experts_per_tok}, mask threshold "
        f"`router_jitter_noise={config.router_jitter_noise}`"
        if config.router_type == "sparsemixer_v2"
        else f"softmax top-{config.num_experts_per_tok} ({'renormalised' if config.router_renormalize else 'raw'} "
        "probabilities)"
    )
    if heads > 1:
        sub_token = config.hidden_size // heads
        routing += f"; MH-MoE: each token is split into {heads} sub-tokens of size {sub_token}, routed apart"
    rows = [
        ("family", "GRIN-MoE" if family == "grin-moe" else "MH-MoE"),
        ("layers (MoE layers)", f"{config.num_hidden_layers} ({moe_layers})"),
        ("hidden size", config.hidden_size),
        ("attention heads / KV heads", f"{config.num_attention_heads} / {config.num_key_value_heads}"),
        ("experts × expert size", f"{config.num_local_experts} × {config.intermediate_size}"),
        ("experts per token (top-k)", config.num_experts_per_tok),
        ("parameters: total / active per token", f"{_billions(total)} / {_billions(active)}"),
        ("vocabulary / context", f"{config.vocab_size} / {config.max_position_embeddings}"),
    ]
    sections = [
        f"# {name}\n",
        f"A {rows[0][1]} causal language model for Hugging Face transformers, made with the `modeling-grin` "
        "library.\n",
        "## Architecture\n\n| | |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows) + "\n",
        f"## Routing\n\n{routing}.\n",
    ]
    if (folder / "expert_load.png").is_file():
        sections.append("![Expert load per layer](expert_load.png)\n")
    usage = (
        "## Usage\n\n```python\nimport modeling_grin  # the modeling-grin package registers the model type\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{name}")\n'
    )
    if (folder / "tokenizer.json").is_file():
        usage += f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n'
    usage += "```\n"
    if "auto_map" in json.loads((folder / "config.json").read_text()):
        usage += (
            "\nThe folder carries its modeling code, so without the package:\n\n```python\n"
            f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)\n```\n'
        )
    sections.append(usage)
    if training_details:
        sections.append(
            "## Training\n\n" + "\n".join(f"- {key}: {value}" for key, value in training_details.items()) + "\n"
        )
    if eval_results:
        sections.append(
            f"## Evaluation ({eval_dataset})\n\n| metric | value |\n|---|---|\n"
            + "\n".join(f"| {metric} | {value:.4g} |" for metric, value in eval_results.items())
            + "\n"
        )
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(sections))
    path = folder / "README.md"
    temporary = folder / "README.md.tmp"
    temporary.write_text(str(card))
    temporary.replace(path)
    return path
