import pytest
import yaml
from conftest import tiny_model
from huggingface_hub import ModelCard
from test_mh_moe import tiny_mh_model

from modeling_grin.cli import main
from modeling_grin.hub import export_remote_code, parameter_counts, write_model_card
from modeling_grin.presets import load_preset


def test_parameter_counts_reproduce_grin_moe_42b_with_6_6b_active():
    total, active = parameter_counts(load_preset("grin-moe"))
    assert total == 41_873_153_344 and active == 6_640_999_744  # the paper's "42B total, 6.6B active"


def test_mh_moe_active_parameters_count_every_sub_token():
    config = load_preset("mh-moe-paper-h2")
    total, active = parameter_counts(config)
    expert = 3 * (768 // 2) * 768
    assert total - active == 6 * (40 - 2 * 2) * expert  # 6 MoE layers, 4 of 40 experts reachable per token


@pytest.mark.parametrize("family", ["grin", "mh_moe"])
def test_card_metadata_and_content(tmp_path, family):
    model = tiny_model() if family == "grin" else tiny_mh_model()
    model.save_pretrained(tmp_path)
    export_remote_code(tmp_path)
    path = write_model_card(tmp_path, base_model="microsoft/GRIN-MoE", training_details={"steps": 3},
                            eval_results={"perplexity": 12.5})
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "mit" and card.data.base_model == "microsoft/GRIN-MoE"
    assert {"moe", "grin-moe" if family == "grin" else "mh-moe"} <= set(card.data.tags)
    assert card.data.eval_results[0].metric_type == "perplexity" and card.data.eval_results[0].metric_value == 12.5
    metadata = yaml.safe_load(path.read_text().split("---")[1])
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == 12.5
    text = card.text
    total, active = parameter_counts(model.config)
    assert "parameters: total / active per token" in text and f"{total / 1e6:.1f}M" in text
    assert "trust_remote_code=True" in text and "steps: 3" in text
    assert ("SparseMixer-v2" in text) == (family == "grin")
    assert ("sub-tokens" in text) == (family == "mh_moe")


def test_card_command(tmp_path, capsys):
    tiny_model().save_pretrained(tmp_path)
    assert main(["card", str(tmp_path), "--metric", "perplexity=9.5", "--license", "apache-2.0"]) == 0
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "apache-2.0" and card.data.eval_results[0].metric_value == 9.5
    assert main(["card", str(tmp_path), "--metric", "perplexity=high"]) == 2
    assert "NAME=NUMBER" in capsys.readouterr().err
    assert main(["card", str(tmp_path / "missing")]) == 2


def test_card_refuses_other_model_types(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="model_type 'llama'"):
        write_model_card(tmp_path)
