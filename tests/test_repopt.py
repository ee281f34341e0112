"""RepOptimizer on the plain RepOpt-VGG trains the same function as SGD on the CSLA model."""
from __future__ import annotations

import math
import operator
import re

import pytest
import torch
import torch.nn.functional as F

from deploykit.errors import DeployError
from deploykit.models import create_model
from deploykit.models.repopt import (
    LinearAddBlock,
    PlainBlock,
    RepOptimizer,
    RepOptVGG,
    extract_scales,
    grad_masks,
    initialize_from_scales,
    merge_kernel,
)

# A small RepOpt-VGG (stage layout of A-type models, fewer and thinner blocks) in float64,
# so that "the same function" can be checked to ~1e-9 instead of float32 noise.
BLOCKS, WIDTHS = (1, 3, 2, 1), (0.25, 0.25)


def _csla_with_random_scales(seed: int = 0) -> RepOptVGG:
    torch.manual_seed(seed)
    model = RepOptVGG(BLOCKS, WIDTHS, num_classes=5, mode="csla").double()
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, LinearAddBlock):
                block.scale_3x3.uniform_(0.3, 1.5)
                block.scale_1x1.uniform_(0.3, 1.5)
                if block.scale_identity is not None:
                    block.scale_identity.uniform_(0.5, 1.5)
    return model


def _plain_equivalent(csla: RepOptVGG) -> RepOptVGG:
    """The target model computing exactly what ``csla`` computes (merged kernels, same BN/head)."""
    plain = RepOptVGG(BLOCKS, WIDTHS, num_classes=5, mode="target").double()
    with torch.no_grad():
        for name, block in csla.named_modules():
            if isinstance(block, LinearAddBlock):
                target = plain.get_submodule(name)
                target.conv.weight.copy_(
                    merge_kernel(block.conv3x3.weight, block.conv1x1.weight, block.scale_3x3, block.scale_1x1, block.scale_identity)
                )
                target.bn.load_state_dict(block.bn.state_dict())
        plain.linear.load_state_dict(csla.linear.state_dict())
    return plain


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    model.train()
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64), torch.randint(0, 5, (4,), generator=gen)) for _ in range(steps)]


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_repoptimizer_on_plain_equals_sgd_on_csla(weight_decay: float) -> None:
    csla = _csla_with_random_scales()
    plain = _plain_equivalent(csla)
    probe = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    csla.eval(), plain.eval()
    torch.testing.assert_close(plain(probe), csla(probe), rtol=1e-10, atol=1e-12)
    before = plain(probe).detach()

    sgd = torch.optim.SGD(csla.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    repopt = RepOptimizer(plain, extract_scales(csla), lr=0.05, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    batches = _batches(steps=4)
    _train(csla, sgd, batches)
    _train(plain, repopt, batches)

    csla.eval(), plain.eval()
    with torch.no_grad():
        after = plain(probe)
        assert (after - before).abs().max() > 1e-3, "training did not move the model; the test would be vacuous"
        torch.testing.assert_close(after, csla(probe), rtol=1e-8, atol=1e-10)
        # And every plain kernel still equals the merged CSLA kernel.
        for name, block in csla.named_modules():
            if isinstance(block, LinearAddBlock):
                merged = merge_kernel(block.conv3x3.weight, block.conv1x1.weight, block.scale_3x3, block.scale_1x1, block.scale_identity)
                torch.testing.assert_close(plain.get_submodule(name).conv.weight, merged, rtol=1e-8, atol=1e-12)


def test_plain_sgd_on_plain_model_does_not_match_csla() -> None:
    """The gradient mask is what makes the two agree: without it they drift apart."""
    csla = _csla_with_random_scales()
    plain = _plain_equivalent(csla)
    batches = _batches(steps=4)
    _train(csla, torch.optim.SGD(csla.parameters(), lr=0.05, momentum=0.9, nesterov=True), batches)
    _train(plain, torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, nesterov=True), batches)
    probe = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    csla.eval(), plain.eval()
    with torch.no_grad():
        assert (plain(probe) - csla(probe)).abs().max() > 1e-4


def test_grad_mask_values() -> None:
    csla = _csla_with_random_scales()
    scales = extract_scales(csla)
    plain = RepOptVGG(BLOCKS, WIDTHS, num_classes=5, mode="target")
    masks = grad_masks(plain, scales)
    assert len(masks) == sum(1 for m in plain.modules() if isinstance(m, PlainBlock))

    with_identity, without = plain.stage2[1], plain.stage2[0]
    for name, block, has_identity in (("stage2.1", with_identity, True), ("stage2.0", without, False)):
        s, t = scales[f"{name}.scale_3x3"], scales[f"{name}.scale_1x1"]
        assert (f"{name}.scale_identity" in scales) is has_identity
        mask = masks[block.conv.weight]
        assert mask.shape == block.conv.weight.shape
        c_out, c_in = mask.shape[:2]
        s2, t2 = (s**2).float(), (t**2).float()
        for c in range(c_out):
            torch.testing.assert_close(mask[c, :, 0, 0], s2[c].expand(c_in))  # off-centre: s^2
            others = [d for d in range(c_in) if d != c]
            torch.testing.assert_close(mask[c, others, 1, 1], (s2[c] + t2[c]).expand(len(others)))  # centre: + t^2
            if c < c_in:  # position [c, c, 1, 1]: + 1 where the block has an identity
                torch.testing.assert_close(mask[c, c, 1, 1], s2[c] + t2[c] + (1.0 if has_identity else 0.0))


def test_initialize_from_scales_builds_the_merged_kernel() -> None:
    csla = _csla_with_random_scales()
    scales = extract_scales(csla)
    plain = RepOptVGG(BLOCKS, WIDTHS, num_classes=5, mode="target").double()
    block = plain.stage2[1]  # has an identity branch
    old = block.conv.weight.detach().clone()
    initialize_from_scales(plain, scales)
    new = block.conv.weight.detach()
    s = scales["stage2.1.scale_3x3"].reshape(-1, 1, 1, 1).double()
    t = scales["stage2.1.scale_1x1"].reshape(-1, 1).double()
    g = scales["stage2.1.scale_identity"].double()

    off_centre = torch.ones(3, 3, dtype=torch.bool)
    off_centre[1, 1] = False
    torch.testing.assert_close(new[:, :, off_centre], (s * old)[:, :, off_centre])
    # Centre = s*W + t*W1 + g*I for a 1x1 kernel W1 drawn from nn.Conv2d's default init.
    w1 = (new[:, :, 1, 1] - s[:, :, 0, 0] * old[:, :, 1, 1] - torch.diag(g)) / t
    bound = 1 / math.sqrt(old.shape[1])
    assert w1.abs().max() <= bound + 1e-9
    assert w1.std() > bound / 4  # really a random kernel, not zeros


def test_merged_kernel_block_equals_csla_block() -> None:
    torch.manual_seed(0)
    for stride, channels in ((1, 8), (2, 8)):
        csla = LinearAddBlock(8, channels, stride, scale_init=0.7, constant=True).double().eval()
        plain = PlainBlock(8, channels, stride).double().eval()
        with torch.no_grad():
            csla.scale_1x1.fill_(1.3)
            plain.conv.weight.copy_(merge_kernel(csla.conv3x3.weight, csla.conv1x1.weight, csla.scale_3x3, csla.scale_1x1, csla.scale_identity))
        x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
        torch.testing.assert_close(plain(x), csla(x))


def test_hyper_search_scales_init_and_safetensors_round_trip(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    hs = create_model("repopt_vgg_a0_hs", num_classes=10, cifar=True)
    scales = extract_scales(hs)
    # Authors' init: 1 for stage0 and each stage's first block, sqrt(2 / i) for 0-based index i >= 1.
    assert torch.all(scales["stage0.scale_3x3"] == 1.0)
    assert torch.all(scales["stage2.0.scale_1x1"] == 1.0)
    assert torch.allclose(scales["stage2.1.scale_3x3"], torch.tensor(math.sqrt(2.0)))
    assert torch.allclose(scales["stage2.3.scale_1x1"], torch.tensor(math.sqrt(2.0 / 3)))
    assert torch.all(scales["stage2.1.scale_identity"] == 1.0)
    assert "stage2.0.scale_identity" not in scales

    save_file(scales, str(tmp_path / "scales.safetensors"))
    loaded = load_file(str(tmp_path / "scales.safetensors"))
    assert loaded.keys() == scales.keys()
    plain = create_model("repopt_vgg_a0", num_classes=10, cifar=True)
    assert len(RepOptimizer(plain, loaded, lr=0.1).grad_masks) == 1 + 2 + 4 + 14 + 1


def test_hyper_search_graph_shows_scale_times_conv() -> None:
    """The fx fuser needs mul(scale parameter, conv output) nodes in the traced graph."""
    hs = create_model("repopt_vgg_a0_hs", num_classes=10, cifar=True)
    graph = torch.fx.symbolic_trace(hs).graph
    muls = set()
    for node in graph.nodes:
        if node.op == "call_function" and node.target in (torch.mul, operator.mul):
            scale, operand = node.args
            assert scale.op == "get_attr"
            muls.add((scale.target, operand.target if operand.op == "call_module" else operand.op))
    blocks = [(name, b) for name, b in hs.named_modules() if isinstance(b, LinearAddBlock)]
    for name, block in blocks:
        assert (f"{name}.scale_3x3", f"{name}.conv3x3") in muls
        assert (f"{name}.scale_1x1", f"{name}.conv1x1") in muls
    assert len(muls) == 2 * len(blocks) + sum(b.scale_identity is not None for _, b in blocks)


@pytest.mark.parametrize(
    ("blocks", "widths", "message"),
    [
        (BLOCKS, (0.5, 0.5), "scales for block 'stage0' have 16 channels but the model has 32; were they extracted"),
        ((1, 4, 2, 1), WIDTHS, "no scales for block 'stage2.3'; were they extracted from a model of the same size?"),
    ],
)
def test_scales_for_another_architecture_are_rejected(blocks: tuple, widths: tuple, message: str) -> None:
    scales = extract_scales(_csla_with_random_scales())
    with pytest.raises(DeployError, match="^" + re.escape(message)):
        grad_masks(RepOptVGG(blocks, widths, mode="target", cifar=True), scales)
