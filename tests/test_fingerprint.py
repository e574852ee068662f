import torch

from quada.fingerprint import model_fingerprint, package_versions
from quada.testing import tiny_model


def test_fingerprint_follows_weights_and_config_not_the_path():
    model, _ = tiny_model("llama", seed=0)
    fingerprint = model_fingerprint(model)
    assert len(fingerprint) == 16
    assert model_fingerprint(tiny_model("llama", seed=0)[0]) == fingerprint
    assert model_fingerprint(tiny_model("llama", seed=1)[0]) != fingerprint
    assert model_fingerprint(tiny_model("qwen2", seed=0)[0]) != fingerprint
    model.config._name_or_path = "/somewhere/else"
    assert model_fingerprint(model) == fingerprint
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] += 1.0
    assert model_fingerprint(model) != fingerprint


def test_package_versions_name_the_stack():
    versions = package_versions()
    assert {"python", "quada", "torch", "transformers"} <= versions.keys()
    assert versions["torch"] != "absent"
