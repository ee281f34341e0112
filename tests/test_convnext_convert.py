"""ConvNeXt's ``linear`` and ``conv1x1`` MLP layouts compute the same function from one checkpoint."""
from __future__ import annotations

import pytest
import torch

from deploykit.errors import DeployError
from deploykit.models import create_model, list_models
from deploykit.models.convnext import convert_convnext_weights

LAYOUTS = [("linear", "conv1x1"), ("conv1x1", "linear")]


def _randomized(name: str, mlp: str) -> torch.nn.Module:
    """A model whose every parameter is random, incl. layer-scale gammas and norm affines far from their init."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, cifar=True, mlp=mlp).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("gamma") or (key.endswith("weight") and param.dim() == 1):  # layer scales, norm affines
                param.uniform_(0.5, 1.5)
            elif key.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize(("source", "target"), LAYOUTS)
def test_converted_checkpoint_computes_the_same_function(source: str, target: str) -> None:
    # Every size shares the Block class, so the smallest one carries this numeric check;
    # test_every_size_converts_strictly below covers the other sizes' names and shapes.
    model = _randomized("convnext_atto", source)
    gammas = [p for k, p in model.named_parameters() if k.endswith("gamma")]
    assert gammas and all(g.std() > 0.1 for g in gammas)  # layer scale really matters in this check

    other = create_model("convnext_atto", num_classes=10, cifar=True, mlp=target).eval()
    other.load_state_dict(convert_convnext_weights(model.state_dict(), to=target), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = model(x), other(x)
    assert expected.abs().max() > 1e-2
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize(("source", "target"), LAYOUTS)
@pytest.mark.parametrize("name", list_models("convnext*"))
def test_every_size_converts_strictly(name: str, source: str, target: str) -> None:
    with torch.device("meta"):
        model = create_model(name, mlp=source)
        other = create_model(name, mlp=target)
    converted = convert_convnext_weights(model.state_dict(), to=target)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in other.state_dict().items()}


def test_round_trip_and_idempotence() -> None:
    state = _randomized("convnext_atto", "linear").state_dict()
    conv = convert_convnext_weights(state, to="conv1x1")
    assert conv["stages.0.0.pwconv1.weight"].shape == (160, 40, 1, 1)
    assert conv["stages.0.0.gamma"].shape == (40, 1, 1)
    assert convert_convnext_weights(conv, to="conv1x1").keys() == conv.keys()
    back = convert_convnext_weights(conv, to="linear")
    assert back.keys() == state.keys()
    for key in state:
        assert torch.equal(back[key], state[key]), key


def test_conv1x1_layout_has_no_permutes_or_linears_in_blocks() -> None:
    """The point of the conv1x1 layout: blocks are convs and NCHW element-wise ops only."""
    model = create_model("convnext_atto", num_classes=10, cifar=True, mlp="conv1x1")
    graph = torch.fx.symbolic_trace(model).graph
    targets = {str(n.target) for n in graph.nodes if n.op == "call_method"}
    assert "permute" not in targets
    linears = [n.target for n in graph.nodes if n.op == "call_module" and isinstance(model.get_submodule(n.target), torch.nn.Linear)]
    assert linears == ["head"]


def test_unknown_layout_is_a_user_error() -> None:
    with pytest.raises(DeployError, match="^convert_convnext_weights: to must be one of linear, conv1x1, not 'nchw'$"):
        convert_convnext_weights({}, to="nchw")
