"""A folder exported with `export_remote_code` loads with trust_remote_code where modeling_grin cannot be imported."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import save_file
from test_mh_moe import tiny_mh_model

from modeling_grin.hub import export_remote_code

LOAD_WITHOUT_PACKAGE = """
import sys
sys.modules["modeling_grin"] = None  # importing the package now fails: only the folder's own code can be used
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert not type(model).__module__.startswith("modeling_grin"), type(model).__module__
input_ids = load_file(folder + "/probe.safetensors")["input_ids"]
with torch.no_grad():
    save_file({"logits": model(input_ids).logits}, folder + "/remote_logits.safetensors")
print(type(model).__name__, type(model).__module__)
"""


@pytest.mark.parametrize("family", ["grin", "mh_moe"])
def test_exported_folder_loads_without_the_package(tmp_path, family):
    model = tiny_model() if family == "grin" else tiny_mh_model()
    model.save_pretrained(tmp_path)
    auto_map = export_remote_code(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == auto_map
    input_ids = torch.randint(1, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": input_ids}, tmp_path / "probe.safetensors")

    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(tmp_path)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ForCausalLM" in result.stdout
    from safetensors.torch import load_file

    remote_logits = load_file(tmp_path / "remote_logits.safetensors")["logits"]
    with torch.no_grad():
        assert torch.equal(remote_logits, model(input_ids).logits)


def test_export_needs_a_saved_folder_of_our_model_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_remote_code(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        export_remote_code(tmp_path)
