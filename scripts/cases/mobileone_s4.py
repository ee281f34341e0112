"""timm's ``mobileone_s4`` with seeded random BatchNorm statistics: the INT8 case of issue #13
that needs no training (``deploykit build scripts/cases/mobileone_s4.py:mobileone_s4 ...``).

pretrained=False (nothing is downloaded), weights from seed 0; every BatchNorm gets random running statistics and
affine parameters (deploykit.fuse's ``_randomize_bn``, seed 0) so that folding them is not the
identity and the fused kernels carry the per-channel scale differences of a trained network.
Needs timm (README: *Models from timm and torchvision*)."""
from __future__ import annotations

SEED = 0


def mobileone_s4(num_classes: int = 1000):  # noqa: ANN201
    import timm
    import torch

    from deploykit.fuse import _randomize_bn

    with torch.random.fork_rng():  # the same weights in every process that builds it, the caller's RNG untouched
        torch.manual_seed(SEED)
        model = timm.create_model("mobileone_s4", pretrained=False, num_classes=num_classes).eval()
    _randomize_bn(model, SEED)
    return model
