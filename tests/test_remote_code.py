"""A folder exported with `export_remote_code` loads with trust_remote_code where modeling_grin cannot be imported."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_informative, informative_model, peak_weights_
from safetensors.torch import save_file
from test_mh_moe import tiny_mh_model

from modeling_grin.hub import export_remote_code

LOAD_WITHOUT_PACKAGE = """
import sys
import warnings
sys.modules["modeling_grin"] = None  # importing the package now fails: only the folder's own code can be used
for category in (FutureWarning, DeprecationWarning):  # upstream drift in the exported code fails, as in the suite
    warnings.filterwarnings("error", category=category, module="transformers_modules")
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert not type(model).__module__.startswith("modeling_grin"), type(model).__module__
input_ids = load_file(folder + "/probe.safetensors")["input_ids"]
with torch.no_grad():
    generated = model.generate(input_ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
                               output_logits=True, return_dict_in_generate=True)  # cached decoding
    save_file({"logits": model(input_ids).logits, "sequences": generated.sequences,
               "step_logits": torch.stack(generated.logits)}, folder + "/remote_outputs.safetensors")
print(type(model).__name__, type(model).__module__)
"""


@pytest.mark.parametrize("family", ["grin", "mh_moe"])
def test_exported_folder_loads_without_the_package(tmp_path, family):
    model = informative_model() if family == "grin" else peak_weights_(tiny_mh_model(sliding_window=6))
    model.save_pretrained(tmp_path)
    auto_map = export_remote_code(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == auto_map
    input_ids = torch.randint(1, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_informative(model, input_ids)
    save_file({"input_ids": input_ids}, tmp_path / "probe.safetensors")

    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(tmp_path)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ForCausalLM" in result.stdout
    from safetensors.torch import load_file

    remote = load_file(tmp_path / "remote_outputs.safetensors")
    with torch.no_grad():
        assert torch.equal(remote["logits"], model(input_ids).logits)
        uncached = model.generate(input_ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
                                  output_logits=True, return_dict_in_generate=True, use_cache=False)
    assert torch.equal(remote["sequences"], uncached.sequences)
    assert (remote["step_logits"] - torch.stack(uncached.logits)).abs().max() <= 1e-4


def test_export_needs_a_saved_folder_of_our_model_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_remote_code(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        export_remote_code(tmp_path)
