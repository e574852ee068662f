import pytest
import torch

from quada.approx.sites import capturing, resolve_decoder
from quada.testing import tiny_model


def test_capturing_hands_over_outputs_and_inputs_and_removes_its_hooks():
    model, _ = tiny_model()
    layer = resolve_decoder(model).layers[1]
    down, kind = layer.tap("down")
    assert kind == "input"
    seen: dict[str, torch.Tensor] = {}
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), capturing({"layer": (layer.layer, "output"), "down": (down, kind)}, seen.__setitem__):
        logits = model(input_ids=ids).logits
    # The decoder layer returns a tuple in some versions: its hidden state is what arrives.
    assert seen["layer"].shape == (1, 4, model.config.hidden_size)
    assert seen["down"].shape == (1, 4, model.config.intermediate_size)
    assert not layer.layer._forward_hooks and not down._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)


def test_capturing_removes_its_hooks_after_an_error():
    model, _ = tiny_model()
    layer = resolve_decoder(model).layers[0].layer
    with pytest.raises(RuntimeError, match="stop"), capturing({0: (layer, "output")}, lambda *_: None):
        raise RuntimeError("stop")
    assert not layer._forward_hooks
