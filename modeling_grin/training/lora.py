"""PEFT LoRA for GRIN-MoE and MH-MoE: attention projections as modules, the fused 3-D experts as parameters."""

import re

from peft import LoraConfig

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")


def lora_config(
    model,
    r: int = 8,
    alpha: int = 16,
    attention: bool = True,
    experts: bool = True,
    extra_modules: tuple[str, ...] = (),
) -> LoraConfig:
    """A `LoraConfig` adapting the attention projections and/or every expert of every MoE layer.

    Experts are stored as 3-D parameters, so they are targeted with PEFT's `target_parameters` (one low-rank update
    per expert). PEFT supports no dropout, DoRA or LoRA bias there, so those stay off. `extra_modules` adds module
    names (e.g. MH-MoE's `head_proj`, `merge_proj`, or the dense layers' `gate_proj`). Every requested target is
    checked against `model`: one that matches nothing raises `ValueError` before any training starts.
    """
    modules = (ATTENTION_MODULES if attention else ()) + tuple(extra_modules)
    parameters = EXPERT_PARAMETERS if experts else ()
    if not modules and not parameters:
        raise ValueError("nothing to adapt: enable attention, experts or pass extra_modules")
    module_names = [name for name, _ in model.named_modules()]
    for target in modules:
        if not any(name == target or name.endswith("." + target) for name in module_names):
            raise ValueError(f"LoRA target module {target!r} matches no module of {type(model).__name__}")
    parameter_names = [name for name, _ in model.named_parameters()]
    for target in parameters:
        if not any(re.search(rf"(^|\.){re.escape(target)}$", name) for name in parameter_names):
            raise ValueError(f"LoRA target parameter {target!r} matches no parameter of {type(model).__name__}")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(modules) or None,
        target_parameters=list(parameters) or None,
        task_type="CAUSAL_LM",
    )
