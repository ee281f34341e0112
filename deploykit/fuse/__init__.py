"""Re-parameterization on the module graph, with an equivalence certificate.

``reparameterize(model)`` traces any model with torch.fx, folds Conv+BN and Linear+BN,
turns BN-only and identity branches into kernels, merges parallel linear branches whose
outputs are summed (grouped convs included) and returns the new model together with a
``Certificate`` of measured errors. A fusion over tolerance raises ``FusionError``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from deploykit.errors import DeployError, FusionError

__all__ = ["FuseResult", "reparameterize", "DEFAULT_TOLERANCE_REL"]

# Float32 models fused in float64 agree to ~1e-6 relative; 1e-4 leaves room for deep nets.
DEFAULT_TOLERANCE_REL = 1e-4


@dataclass
class FuseResult:
    model: Any  # torch.fx.GraphModule in eval mode
    certificate: Any  # deploykit.fuse.certificate.Certificate, or None when check=False


def _trace(model: Any):
    from torch import fx

    try:
        return fx.symbolic_trace(copy.deepcopy(model).eval())
    except Exception as err:  # fx raises many types for untraceable Python
        raise DeployError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); "
            "deploykit fuses on the traced graph, so forward() must not branch on tensor values"
        ) from err


def _record(gm: Any, inputs: Any) -> dict[str, Any]:
    """Every node's value for ``inputs`` (to check each fused block on its true input)."""
    import torch
    from torch import fx

    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if isinstance(result, torch.Tensor):
                values[n.name] = result.detach()
            return result

    with torch.no_grad():
        Recorder(gm).run(inputs)
    return values


def _randomize_bn(model: Any, seed: int) -> None:
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is not None:
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                if module.weight is not None:
                    module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    module.bias.copy_(torch.randn(n, generator=gen) * 0.2)


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


def reparameterize(
    model: Any,
    *,
    input_shape: tuple[int, ...] | None = None,
    example_inputs: Any = None,
    tolerance_rel: float = DEFAULT_TOLERANCE_REL,
    check: bool = True,
    seed: int = 0,
) -> FuseResult:
    """Fuse ``model`` (left untouched) into its deploy form and certify the result."""
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    from deploykit.fuse.certificate import BlockCheck, Certificate, EndToEndCheck, ErrorFigures
    from deploykit.fuse.graph import rewrite

    if input_shape is None:
        size = int(getattr(model, "default_input_size", 224))
        input_shape = (2, 3, size, size)
    gen = torch.Generator().manual_seed(seed)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    random_inputs = torch.randn(*input_shape, generator=gen).to(dtype)

    gm = _trace(model)
    try:
        ShapeProp(gm).propagate(random_inputs)
    except Exception as err:
        raise DeployError(f"model does not run on input of shape {tuple(input_shape)}: {err}") from err
    if not check:
        rewrite(gm)
        return FuseResult(gm.eval(), None)

    out_name = _output_name(gm)
    # 1. Structure check on a copy whose BN statistics are randomized: freshly initialized
    #    BNs are identities and would hide a wrong fold.
    randomized = copy.deepcopy(gm)
    _randomize_bn(randomized, seed)
    values_rand = _record(randomized, random_inputs)
    plan_rand = rewrite(randomized)
    errors_rand = _block_errors(randomized, plan_rand, values_rand)
    with torch.no_grad():
        e2e = [
            EndToEndCheck(
                "random (randomized BN statistics)",
                list(input_shape),
                ErrorFigures.between(values_rand[out_name], randomized(random_inputs)),
            )
        ]
    # 2. The real fusion, checked on random and caller inputs.
    params_before = sum(p.numel() for p in model.parameters())
    values = _record(gm, random_inputs)
    given_values = [_record(gm, x) for x in _as_list(example_inputs)]
    plan = rewrite(gm)
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
        unfused=[{"node": u.node, "reason": u.reason} for u in plan.unfused],
        params_before=params_before,
        params_after=sum(p.numel() for p in gm.parameters()),
    )
    if not certificate.passed:
        raise FusionError("fused model is not equivalent to the original: " + "; ".join(certificate.failures()[:5]))
    return FuseResult(gm.eval(), certificate)


def _as_list(inputs: Any) -> list[Any]:
    if inputs is None:
        return []
    return list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
