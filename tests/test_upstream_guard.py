"""The guard in conftest: a deprecated upstream API reached from our code fails the suite, from a test it does not."""

import pytest
from conftest import tiny_model


def test_deprecated_transformers_api_called_from_our_package_is_an_error():
    model = tiny_model()
    # Code compiled as a module of our package, calling an API that transformers 5.24 deprecates with stacklevel 1.
    with pytest.raises(FutureWarning, match=r"reached from modeling_grin\.probe"):
        exec("model.gradient_checkpointing_enable()", {"model": model, "__name__": "modeling_grin.probe"})


def test_the_same_call_from_a_test_only_warns():
    model = tiny_model()
    with pytest.warns(FutureWarning, match="gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
