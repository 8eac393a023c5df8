"""DeepSpeed ZeRO-3 leaf modules: set by the models themselves when ZeRO-3 is active, and by the training loop when
Accelerate runs ZeRO-3. DeepSpeed is not installed here, so `deepspeed.utils` is replaced by a recorder that applies
the same rule as DeepSpeed's `set_z3_leaf_modules` (exact classes; an error when nothing matches)."""

import sys
import types
from types import SimpleNamespace

import pytest
from conftest import tiny_model
from test_mh_moe import tiny_mh_model

import modeling_grin.modeling_grin_moe as modeling
from modeling_grin.modeling_grin_moe import GrinMoeSparseMoeBlock
from modeling_grin.modeling_mh_moe import MhMoeSparseMoeBlock
from modeling_grin.training import loop


@pytest.fixture
def fake_deepspeed(monkeypatch):
    calls = []

    def set_z3_leaf_modules(model, classes):
        assert all(isinstance(cls, type) for cls in classes)
        leaves = [module for module in model.modules() if type(module) in classes]
        if not leaves:
            raise ValueError("no module matched")
        for module in leaves:
            module._z3_leaf = True
        calls.append((model, classes))

    utils = types.ModuleType("deepspeed.utils")
    utils.set_z3_leaf_modules = set_z3_leaf_modules
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    monkeypatch.setitem(sys.modules, "deepspeed.utils", utils)
    return calls


@pytest.mark.parametrize(
    "build, block_class", [(tiny_model, GrinMoeSparseMoeBlock), (tiny_mh_model, MhMoeSparseMoeBlock)]
)
def test_models_mark_their_moe_blocks_as_leaves_under_zero3(monkeypatch, fake_deepspeed, build, block_class):
    monkeypatch.setattr(modeling, "is_deepspeed_zero3_enabled", lambda: True)
    model = build()
    blocks = [module for module in model.modules() if isinstance(module, GrinMoeSparseMoeBlock)]
    assert blocks and all(type(block) is block_class and block._z3_leaf for block in blocks)
    assert fake_deepspeed[-1][1] == [block_class]
    # Nothing inside a block is a leaf of its own: the block is gathered as one unit.
    assert not any(getattr(module, "_z3_leaf", False) for block in blocks for module in block.modules() if module
                   is not block)


def test_nothing_is_marked_without_zero3(fake_deepspeed):
    model = tiny_model()
    assert fake_deepspeed == []
    assert not any(getattr(module, "_z3_leaf", False) for module in model.modules())


def test_training_loop_marks_leaves_when_accelerate_runs_zero3(fake_deepspeed):
    model = tiny_model()
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    assert loop._uses_zero3(accelerator)
    loop.mark_moe_blocks_as_zero3_leaves(model)
    blocks = [module for module in model.modules() if isinstance(module, GrinMoeSparseMoeBlock)]
    assert fake_deepspeed and all(block._z3_leaf for block in blocks)
    assert not loop._uses_zero3(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)))
    assert not loop._uses_zero3(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2))))


def test_zero3_without_deepspeed_says_so(monkeypatch):
    monkeypatch.setattr(modeling, "is_deepspeed_zero3_enabled", lambda: True)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed.utils` raises ImportError
    monkeypatch.setitem(sys.modules, "deepspeed.utils", None)
    with pytest.raises(ImportError, match=r"^DeepSpeed ZeRO-3 is active but deepspeed cannot be imported$"):
        tiny_model()
