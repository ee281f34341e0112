"""Re-parameterization on the module graph, with an equivalence certificate.

``reparameterize(model)`` traces any model with torch.fx, folds Conv+BN and Linear+BN,
turns BN-only and identity branches into kernels, merges parallel linear branches whose
outputs are summed (grouped convs included) and returns the new model together with a
``Certificate`` of measured errors. A fusion over tolerance raises ``FusionError``; one that
left fusible structure (BatchNorm not folded, parallel branches not merged) raises
``PartialFusionError`` unless ``accept_partial=True``. The caller's model is never modified.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from deploykit.errors import DeployError, FusionError, PartialFusionError

__all__ = ["FuseResult", "reparameterize", "DEFAULT_TOLERANCE_REL"]

# Float32 models fused in float64 agree to ~1e-6 relative; 1e-4 leaves room for deep nets.
DEFAULT_TOLERANCE_REL = 1e-4


@dataclass
class FuseResult:
    model: Any  # torch.fx.GraphModule in eval mode
    certificate: Any  # deploykit.fuse.certificate.Certificate, or None when check=False


@dataclass
class _Traced:
    gm: Any  # normalized torch.fx.GraphModule with ShapeProp metadata
    provenance: dict[str, set[str]]  # folded constant -> the tensors it was computed from


def _trace(model: Any, inputs: Any, *, randomize_seed: int | None = None) -> _Traced:
    """Trace a copy of ``model`` (BN statistics randomized when a seed is given) and normalize it."""
    from torch import fx
    from torch.fx.passes.shape_prop import ShapeProp

    from deploykit.fuse.normalize import normalize

    model = copy.deepcopy(model).eval()
    if randomize_seed is not None:
        _randomize_bn(model, randomize_seed)
    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types for untraceable Python
        raise DeployError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); "
            "deploykit fuses on the traced graph, so forward() must not branch on tensor values"
        ) from err
    try:
        ShapeProp(gm).propagate(inputs)
    except Exception as err:
        raise DeployError(f"model does not run on input of shape {tuple(inputs.shape)}: {err}") from err
    provenance = normalize(gm)
    ShapeProp(gm).propagate(inputs)  # metadata for the nodes the passes created
    return _Traced(gm, provenance)


def _record(gm: Any, inputs: Any) -> dict[str, Any]:
    """Every node's value for ``inputs`` (to check each fused block on its true input)."""
    import torch
    from torch import fx

    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if isinstance(result, torch.Tensor):
                # A copy: an in-place op later in the graph (ReLU(inplace=True)) would overwrite a view.
                values[n.name] = result.detach().clone()
            return result

    with torch.no_grad():
        Recorder(gm).run(inputs)
    return values


def _randomize_bn(model: Any, seed: int) -> None:
    """Random statistics for every BatchNorm (subclasses and frozen BNs included), in place."""
    import torch

    from deploykit.fuse.normalize import bn_like_modules

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in bn_like_modules(model).values():
            if getattr(module, "running_var", None) is None:
                continue
            n = module.running_var.numel()
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
            module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor):
                weight.copy_(torch.rand(n, generator=gen) + 0.5)
                bias.copy_(torch.randn(n, generator=gen) * 0.2)


def _block_errors(gm: Any, plan: Any, values: dict[str, Any]) -> dict[str, Any]:
    import torch

    from deploykit.fuse.certificate import ErrorFigures

    errors = {}
    with torch.no_grad():
        for block in plan.blocks:
            module = gm.get_submodule(block.module)
            errors[block.module] = ErrorFigures.between(values[block.node], module(values[block.term.input.name]))
    return errors


def _output_name(gm: Any) -> str:
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    (result,) = output.args
    if not hasattr(result, "name"):
        raise DeployError("fuse expects a model with a single tensor output")
    return result.name


def _count_convs(model: Any) -> int:
    from torch import nn

    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def reparameterize(
    model: Any,
    *,
    input_shape: tuple[int, ...] | None = None,
    example_inputs: Any = None,
    tolerance_rel: float = DEFAULT_TOLERANCE_REL,
    check: bool = True,
    seed: int = 0,
    accept_partial: bool = False,
) -> FuseResult:
    """Fuse a copy of ``model`` into its deploy form and certify the result.

    ``accept_partial``: return a model that still holds BatchNorm or parallel branches the
    engine could not fold (the certificate lists them) instead of raising ``PartialFusionError``.
    """
    import torch

    from deploykit.fuse.certificate import BlockCheck, Certificate, EndToEndCheck, ErrorFigures, Leftover
    from deploykit.fuse.graph import rewrite
    from deploykit.fuse.normalize import bn_like_modules

    if input_shape is None:
        size = int(getattr(model, "default_input_size", 224))
        input_shape = (2, 3, size, size)
    gen = torch.Generator().manual_seed(seed)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    random_inputs = torch.randn(*input_shape, generator=gen).to(dtype)
    batchnorms = set(bn_like_modules(model))

    traced = _trace(model, random_inputs)
    gm = traced.gm
    if not check:
        rewrite(gm, batchnorms, traced.provenance)
        return FuseResult(gm.eval(), None)

    out_name = _output_name(gm)
    # 1. Structure check on a copy whose BN statistics are randomized: freshly initialized
    #    BNs are identities and would hide a wrong fold.
    randomized = _trace(model, random_inputs, randomize_seed=seed)
    values_rand = _record(randomized.gm, random_inputs)
    plan_rand = rewrite(randomized.gm, batchnorms, randomized.provenance)
    errors_rand = _block_errors(randomized.gm, plan_rand, values_rand)
    with torch.no_grad():
        e2e = [
            EndToEndCheck(
                "random (randomized BN statistics)",
                list(input_shape),
                ErrorFigures.between(values_rand[out_name], randomized.gm(random_inputs)),
            )
        ]
    # 2. The real fusion, checked on random and caller inputs.
    params_before = sum(p.numel() for p in model.parameters())
    values = _record(gm, random_inputs)
    given_values = [_record(gm, x) for x in _as_list(example_inputs)]
    plan = rewrite(gm, batchnorms, traced.provenance)
    errors_real = _block_errors(gm, plan, values)
    with torch.no_grad():
        e2e.append(EndToEndCheck("random", list(input_shape), ErrorFigures.between(values[out_name], gm(random_inputs))))
        for x, recorded in zip(_as_list(example_inputs), given_values):
            e2e.append(EndToEndCheck("caller inputs", list(x.shape), ErrorFigures.between(recorded[out_name], gm(x))))
    blocks = [
        BlockCheck(b.module, b.kind, b.sources, errors_rand.get(b.module, errors_real[b.module]), errors_real[b.module])
        for b in plan.blocks
    ]
    certificate = Certificate(
        tolerance_rel=tolerance_rel,
        blocks=blocks,
        end_to_end=e2e,
        unfused=[{"node": u.node, "reason": u.reason} for u in plan.unfused if u.kind in ("residual", "kept")],
        params_before=params_before,
        params_after=sum(p.numel() for p in gm.parameters()),
        left=[Leftover(u.node, u.kind, u.reason) for u in plan.left],
        batchnorm_before=len(batchnorms),
        convs_before=_count_convs(model),
        convs_after=_count_convs(gm),
        accept_partial=accept_partial,
    )
    if not certificate.equivalent:
        raise FusionError("fused model is not equivalent to the original: " + "; ".join(certificate.failures()[:5]))
    if not certificate.passed:
        shown = "; ".join(f"{x.name}: {x.reason}" for x in certificate.left[:3])
        more = f" (and {len(certificate.left) - 3} more)" if len(certificate.left) > 3 else ""
        raise PartialFusionError(
            f"fusion left {certificate.left_summary()}: {shown}{more}; "
            "pass accept_partial=True (--accept-partial) to accept a partial fusion",
            certificate,
        )
    return FuseResult(gm.eval(), certificate)


def _as_list(inputs: Any) -> list[Any]:
    if inputs is None:
        return []
    return list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
