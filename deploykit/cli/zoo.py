"""`deploykit models`, `deploykit fuse`, `deploykit export`."""
from __future__ import annotations

from pathlib import Path

import click

from deploykit.cli.options import ACCEPT_PARTIAL_HELP, DEFAULT_THREADS, load, model_options, write_json


@click.command()
@click.option("--info", "info_name", metavar="NAME", help="Describe one model: params, MACs, forms.")
@click.option("--input-size", type=click.IntRange(8, 4096), default=None, help="Input size for MACs (default: the model's).")
@click.option("--cifar", is_flag=True, help="The 32x32 CIFAR variant.")
@click.option("--num-classes", type=click.IntRange(1), default=1000, show_default=True)
@click.argument("pattern", required=False, default="*")
def models(info_name: str | None, input_size: int | None, cifar: bool, num_classes: int, pattern: str) -> None:
    """List the model zoo (optionally filtered by a glob PATTERN), or describe one model.

    \b
    Examples:
      deploykit models
      deploykit models 'repvgg*'
      deploykit models --info repvgg_a0 --input-size 224
    """
    from rich.console import Console
    from rich.table import Table

    from deploykit.models import get_entry, list_models

    console = Console()
    if info_name is None:
        table = Table("family", "paper params", "paper MACs", "paper")
        table.add_column("model", no_wrap=True)
        table.columns.insert(0, table.columns.pop())
        for name in list_models(pattern):
            e = get_entry(name)
            table.add_row(
                name,
                e.family,
                f"{e.paper_params / 1e6:.2f}M" if e.paper_params else "",
                f"{e.paper_macs / 1e9:.2f}G" if e.paper_macs else "",
                e.paper.split(",")[0],
            )
        console.print(table)
        return
    from deploykit.models.info import describe

    info = describe(info_name, num_classes=num_classes, cifar=cifar, input_size=input_size)
    table = Table("", "train form", "deploy form", "paper", title=f"{info_name} at {info['input_size']}x{info['input_size']}")
    table.add_row("params", f"{info['train_params']:,}", f"{info['deploy_params']:,}", f"{info['paper_params']:,.0f}" if info["paper_params"] else "")
    table.add_row("MACs", f"{info['train_macs']:,}", f"{info['deploy_macs']:,}", f"{info['paper_macs']:,.0f}" if info["paper_macs"] else "")
    console.print(table)
    console.print(f"family: {info['family']}   paper: {info['paper']}")
    console.print(f"deploy form: {info['fused_blocks']} fused blocks ({info['deploy_note']})")


@click.command()
@click.argument("model")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Fused checkpoint (.pt or .safetensors); .onnx for an .onnx MODEL.")
@click.option("--report", type=click.Path(path_type=Path), help="Write the equivalence certificate as JSON.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=None,
              help="Max relative error allowed (default 1e-4; 0 demands bit-exact outputs).")
@click.option("--accept-partial", is_flag=True, help=ACCEPT_PARTIAL_HELP)
@click.option("--force", is_flag=True, help="Replace existing outputs.")
@model_options
def fuse(model: str, out: Path, report: Path | None, tolerance: float | None, accept_partial: bool, force: bool,
         num_classes, cifar, input_size, weights) -> None:
    """Re-parameterize MODEL (zoo name, timm:NAME, torchvision:NAME, file.py:factory, checkpoint or .onnx).

    The fusion is certified: per fused block and end to end, on random inputs with randomized
    BatchNorm statistics and with the real weights. Exit code 3 when it is not equivalent, or
    when BatchNorm or parallel branches are left unfolded (unless --accept-partial). An .onnx
    MODEL is rewritten on its graph (Conv+BN folds, summed parallel branches merged into one
    Conv) and certified on ONNX Runtime; --out is then an .onnx file.

    \b
    Examples:
      deploykit fuse repvgg_a0 --out repvgg_a0-fused.pt --report fused.json
      deploykit fuse timm:repvgg_a0 --weights repvgg_a0.safetensors --out fused.safetensors
      deploykit fuse my-export.onnx --out my-export-fused.onnx
    """
    from deploykit.checkpoint import save_checkpoint
    from deploykit.errors import PartialFusionError
    from deploykit.files import check_writable
    from deploykit.fuse import DEFAULT_TOLERANCE_REL, reparameterize

    check_writable(out, force=force)
    if report:
        check_writable(report, force=force)
    from deploykit.onnxio import is_onnx_model

    if is_onnx_model(model):
        _fuse_onnx(Path(model), out, report, tolerance, force)
        return
    loaded = load(model, num_classes, cifar, input_size, weights)
    if loaded.form == "deploy":
        raise click.UsageError(f"{model} is already in deploy form")
    try:
        result = reparameterize(
            loaded.model, input_shape=(2, 3, loaded.input_size, loaded.input_size),
            tolerance_rel=DEFAULT_TOLERANCE_REL if tolerance is None else tolerance, accept_partial=accept_partial,
        )
    except PartialFusionError as err:  # the JSON report lists what is left either way
        if report and err.certificate is not None:
            write_json(report, {"model": loaded.name, "certificate": err.certificate.to_dict()}, force=force)
        raise
    save_checkpoint(result.model, out, spec=loaded.spec, form="deploy", force=force)
    if report:
        write_json(report, {"model": loaded.name, "certificate": result.certificate.to_dict()}, force=force)
    click.echo(result.certificate.summary())
    click.echo(f"wrote {out}")


def _fuse_onnx(path: Path, out: Path, report: Path | None, tolerance: float | None, force: bool) -> None:
    from deploykit.backends.onnxruntime import OnnxRuntimeRunner
    from deploykit.files import atomic_file
    from deploykit.fuse.onnx_graph import fuse_onnx_file
    from deploykit.onnxio import check_image_model

    if out.suffix.lower() != ".onnx":
        raise click.UsageError(f"--out {out}: an .onnx MODEL is fused into an .onnx file")
    size = check_image_model(path)
    with atomic_file(out, force=force) as tmp:
        result = fuse_onnx_file(path, tmp, input_size=size, tolerance_rel=tolerance,
                                runner=lambda file: OnnxRuntimeRunner(file, threads=DEFAULT_THREADS))
        if result is None:
            raise click.UsageError(f"{path.name} has nothing to fuse: no Conv+BatchNormalization pair and no "
                                   "summed parallel convolution branches")
    if report:
        write_json(report, {"model": path.name, "certificate": result.to_dict()}, force=force)
    click.echo(result.summary())
    click.echo(f"wrote {out}")


@click.command()
@click.argument("model")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="ONNX file to write.")
@click.option("--fuse", "do_fuse", is_flag=True, help="Re-parameterize first (certified).")
@click.option("--batch", default="1", show_default=True, help="Batch size, or 'dynamic'.")
@click.option("--opset", type=click.IntRange(11, 23), default=17, show_default=True)
@click.option("--report", type=click.Path(path_type=Path), help="Write export (and fusion) figures as JSON.")
@click.option("--accept-partial", is_flag=True, help=ACCEPT_PARTIAL_HELP)
@click.option("--force", is_flag=True, help="Replace existing outputs.")
@model_options
def export(model: str, out: Path, do_fuse: bool, batch: str, opset: int, report: Path | None, accept_partial: bool,
           force: bool, num_classes, cifar, input_size, weights) -> None:
    """Export MODEL to a single ONNX file, checked by onnx.checker and against ONNX Runtime.

    \b
    Examples:
      deploykit export repvgg_a0 --fuse --out repvgg_a0.onnx
      deploykit export convnext_atto --cifar --num-classes 10 --batch dynamic --out c.onnx
    """
    from deploykit.export import export_onnx
    from deploykit.files import check_writable
    from deploykit.fuse import reparameterize

    if batch != "dynamic" and not batch.isdigit():
        raise click.BadParameter("must be a positive integer or 'dynamic'", param_hint="--batch")
    check_writable(out, force=force)
    loaded = load(model, num_classes, cifar, input_size, weights)
    net, certificate = loaded.model, None
    if do_fuse and loaded.form == "train":
        result = reparameterize(net, input_shape=(2, 3, loaded.input_size, loaded.input_size), accept_partial=accept_partial)
        net, certificate = result.model, result.certificate
        click.echo(certificate.summary())
    export_report = export_onnx(net, out, input_size=loaded.input_size, batch=batch if batch == "dynamic" else int(batch), opset=opset, force=force)
    ort = export_report.onnxruntime
    if ort.get("checked"):
        click.echo(f"ONNX Runtime vs PyTorch: max abs {ort['max_abs_error']:.3e}, max rel {ort['max_rel_error']:.3e}")
    else:
        click.echo(f"ONNX Runtime check skipped: {ort.get('reason')}")
    if report:
        data = {"model": loaded.name, "export": export_report.to_dict()}
        if certificate is not None:
            data["certificate"] = certificate.to_dict()
        write_json(report, data, force=force)
    click.echo(f"wrote {out}")
