"""Checkpoints in timm's and the official RepVGG naming load into the zoo models, by keys alone."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deploykit.errors import DeployError
from deploykit.loading import load_model
from deploykit.models import create_model
from deploykit.models.keymaps import from_zoo, to_zoo


def _zoo(name: str = "repvgg_a0") -> torch.nn.Module:
    from deploykit.fuse import _randomize_bn

    model = create_model(name, num_classes=10, cifar=True).eval()
    _randomize_bn(model, 2)
    return model


def test_timm_naming_round_trips_and_is_detected() -> None:
    state = _zoo().state_dict()
    timm_state = from_zoo(state, "timm-repvgg")
    assert "stem.conv_kxk.conv.weight" in timm_state and "stages.0.0.conv_1x1.bn.running_var" in timm_state
    assert "stages.0.1.identity.weight" in timm_state and "head.fc.weight" in timm_state
    back, used = to_zoo(timm_state, "repvgg")
    assert used == "timm-repvgg" and list(back) == list(state)


@pytest.mark.parametrize("naming", ["timm-repvgg", "official", "official-ddp"])
def test_foreign_checkpoint_loads_strict_with_identical_outputs(naming: str, tmp_path: Path) -> None:
    model = _zoo()
    state = model.state_dict()
    if naming == "timm-repvgg":
        state = from_zoo(state, naming)
    elif naming == "official-ddp":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    loaded = load_model("repvgg_a0", num_classes=10, cifar=True, weights=str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))


def test_checkpoint_of_another_model_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(_zoo("repvgg_a1").state_dict(), path)
    with pytest.raises(DeployError, match=r"does not fit model repvgg_a0: tensor stage0.rbr_dense.conv.weight has shape \(64, 3, 3, 3\), the model expects \(48, 3, 3, 3\)"):
        load_model("repvgg_a0", num_classes=10, cifar=True, weights=str(path))


def test_raw_state_dict_as_model_says_how_to_load_it(tmp_path: Path) -> None:
    path = tmp_path / "raw.pth"
    torch.save(_zoo().state_dict(), path)
    with pytest.raises(DeployError, match=r"--weights"):
        load_model(str(path))


def test_real_timm_repvgg_state_dict_loads_into_the_zoo_model() -> None:
    try:
        import timm
    except Exception as err:
        pytest.skip(f"timm not usable here ({type(err).__name__})")
    source = timm.create_model("repvgg_a0", pretrained=False, num_classes=10).eval()
    from deploykit.fuse import _randomize_bn

    _randomize_bn(source, 4)
    state, used = to_zoo(source.state_dict(), "repvgg")
    model = create_model("repvgg_a0", num_classes=10).eval()
    model.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert used == "timm-repvgg" and torch.allclose(model(x), source(x), rtol=1e-5, atol=1e-5)
