"""`deploykit train` and `deploykit analyze`: thin wrappers over deploykit.train and deploykit.quant."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from deploykit.cli.options import DEFAULT_ANALYZE_SAMPLES, DEFAULT_THREADS, THREADS


def _progress_ui(console: Any) -> Any:
    """A TrainProgress drawing one rich bar per epoch and printing a line when an epoch ends."""
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )

    from deploykit.train.loop import TrainProgress

    class RichProgress(TrainProgress):
        def __init__(self) -> None:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=console, transient=True)
            self.task = None
            self.epochs = self.steps = 0

        def start(self, *, epochs: int, steps: int, epoch: int, step: int) -> None:
            self.epochs, self.steps = epochs, steps
            self.bar.start()
            if epoch < epochs:
                self.task = self.bar.add_task(f"epoch {epoch + 1}/{epochs}", total=steps, completed=step, loss="-")

        def step(self, *, epoch: int, step: int, loss: float) -> None:
            if self.task is None:
                self.task = self.bar.add_task("", total=self.steps, loss="-")
            self.bar.update(self.task, description=f"epoch {epoch}/{self.epochs}", completed=step, loss=f"{loss:.4f}")

        def epoch(self, record: Any) -> None:
            val = "-" if record.val_top1 is None else f"{record.val_top1:.4f}"
            console.print(f"epoch {record.epoch}/{self.epochs}: loss {record.train_loss:.4f}  "
                          f"train top-1 {record.train_top1:.4f}  val top-1 {val}  lr {record.lr:.4g}  "
                          f"{record.seconds:.1f} s")
            if self.task is not None:
                self.bar.reset(self.task, total=self.steps, completed=0, loss="-")

        def stop(self) -> None:
            self.bar.stop()

    return RichProgress()


@click.command("train")
@click.argument("model")
@click.option("--data", required=True,
              help="Labeled images: folder tree (train/<class>/..., test/<class>/...) or its .tar.gz.")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Run directory (e.g. runs/NAME).")
@click.option("--epochs", type=click.IntRange(min=1), required=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
              help="Peak learning rate (cosine to 0).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=5e-4, show_default=True,
              help="On conv/linear weights only.")
@click.option("--momentum", type=click.FloatRange(0, 1), default=0.9, show_default=True, help="Nesterov momentum.")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=THREADS, default=DEFAULT_THREADS, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda on a GPU machine.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Train on a seeded subset of N images.")
@click.option("--val-limit", type=click.IntRange(min=1), default=None, help="Validate on a seeded subset of N images.")
@click.option("--split", default="train", show_default=True, help="Subfolder of --data to train on.")
@click.option("--val-split", default="test", show_default=True,
              help="Subfolder validated on after each epoch; 'none' to skip.")
@click.option("--num-classes", type=click.IntRange(min=1), default=None, help="Default: the number of class folders.")
@click.option("--cifar", is_flag=True, help="Zoo model in its CIFAR (32x32) form.")
@click.option("--width", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Width multiplier passed to the model factory (channels x W).")
@click.option("--input-size", type=click.IntRange(8, 4096), default=None,
              help="Training resolution (default: the model's).")
@click.option("--recipe", default=None, help="Preprocessing recipe (default: cifar10 for inputs up to 64 px).")
@click.option("--repopt", is_flag=True, help="RepOpt-VGG pipeline: hyper-search MODEL_hs, extract scales, train MODEL "
              "with the RepOptimizer.")
@click.option("--hs-epochs", type=click.IntRange(min=1), default=None,
              help="--repopt: hyper-search epochs (default: --epochs).")
@click.option("--custom-l2", is_flag=True,
              help="RepVGG: the official recipe's weight decay on the equivalent kernel instead of plain L2.")
@click.option("--schedule", type=click.Choice(["cosine", "onecycle"]), default="cosine", show_default=True,
              help="cosine to 0 after --warmup-epochs, or one-cycle (linear up to the peak, linear down to 0).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "auto"]), default="fp32", show_default=True,
              help="Autocast: auto = bf16 where the CPU reports avx512_bf16/amx_bf16 (or the GPU has bf16).")
@click.option("--ema", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="EMA decay of the weights (e.g. 0.999): the average is validated, kept and saved.")
@click.option("--tta-flip", is_flag=True, help="Validate on the logits of each image plus its mirror image.")
@click.option("--keep-every", type=click.IntRange(min=1), default=None,
              help="Also keep the weights of every N-th epoch (and the last) in OUT/checkpoints/.")
@click.option("--eval-every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Validate every N-th epoch (and the last and every kept one): validation costs time.")
@click.option("--compile", "compile_model", is_flag=True,
              help="torch.compile the training step (about a minute to compile; needs a C++ compiler on CPU).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--force", is_flag=True, help="Start over, replacing the run in --out.")
def train(model: str, data: str, out: Path, epochs: int, batch_size: int, lr: float, weight_decay: float,
          momentum: float, label_smoothing: float, warmup_epochs: float, seed: int, threads: int, device: str,
          limit: int | None,
          val_limit: int | None, split: str, val_split: str, num_classes: int | None, cifar: bool,
          width: float | None, input_size: int | None, recipe: str | None, repopt: bool, hs_epochs: int | None,
          custom_l2: bool, schedule: str, precision: str, ema: float | None, tta_flip: bool,
          keep_every: int | None, eval_every: int, compile_model: bool, resume: bool, force: bool) -> None:
    """Train zoo MODEL on a labeled image folder: SGD with Nesterov momentum, cosine schedule,
    label smoothing, random-crop and flip augmentation; seeded and deterministic.

    A checkpoint (safetensors) is written after every epoch; Ctrl-C saves one and exits 130;
    --resume continues exactly where the run stopped. The final model is OUT/model.safetensors
    (OUT/target/model.safetensors with --repopt), ready for `deploykit build`.

    \b
    Examples:
      deploykit train repvgg_a0 --cifar --data ../shared/data/cifar10-jpeg.tar.gz --epochs 30 --out runs/repvgg
      deploykit train repopt_vgg_a0 --repopt --cifar --data data/cifar10 --epochs 30 --out runs/repopt
      deploykit train qarepvgg_a0 --cifar --data data/cifar10 --epochs 20 --schedule onecycle --precision auto \\
          --ema 0.999 --tta-flip --keep-every 5 --out runs/qarepvgg
    """
    from rich.console import Console

    from deploykit.calib import default_recipe, load_recipe
    from deploykit.calib.recipes import fit_recipe
    from deploykit.errors import UsageError
    from deploykit.models import create_model
    from deploykit.train.data import load_image_set
    from deploykit.train.loop import TrainConfig
    from deploykit.train.loop import train as run_train

    if resume and force:
        raise UsageError("--resume continues a run and --force replaces it: pass one")
    if hs_epochs is not None and not repopt:
        raise UsageError("--hs-epochs applies to --repopt only")
    kwargs: dict[str, Any] = {} if width is None else {"width": width}
    probe = create_model(f"{model}_hs" if repopt and not model.endswith("_hs") else model, num_classes=1, cifar=cifar,
                         **kwargs)
    size = input_size or int(getattr(probe, "default_input_size", 224))
    chosen = fit_recipe(load_recipe(recipe), size) if recipe else default_recipe(size)
    pre = chosen.preprocessing
    train_data = load_image_set(data, split, pre, limit=limit, seed=seed)
    val_data = None
    if val_split.lower() != "none":
        val_data = load_image_set(data, val_split, pre, limit=val_limit, seed=seed, require_split=True)
    spec_fields = {"num_classes": num_classes or len(train_data.classes), "cifar": cifar, **kwargs}
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         label_smoothing=label_smoothing, warmup_epochs=warmup_epochs, seed=seed, threads=threads,
                         limit=limit, val_limit=val_limit, device=device, custom_l2=custom_l2, schedule=schedule,
                         precision=precision, ema=ema, tta_flip=tta_flip, keep_every=keep_every,
                         eval_every=eval_every, compile=compile_model)
    console = Console(stderr=True)
    console.print(f"training on {len(train_data)} images from {train_data.description}"
                  + (f", validating on {len(val_data)} from {val_data.description}" if val_data else ""))
    progress = _progress_ui(console)
    try:
        if repopt:
            from dataclasses import replace

            from deploykit.train.repopt import train_repopt

            result = train_repopt(model, spec_fields, train_data, val_data, out,
                                  hs_config=replace(config, epochs=hs_epochs or epochs), target_config=config,
                                  preprocessing=pre, resume=resume, force=force, progress=progress)
            final = result.target
        else:
            final = run_train({"name": model, **spec_fields}, train_data, val_data, out, config, preprocessing=pre,
                              resume=resume, force=force, progress=progress)
    finally:
        progress.stop()
    top1 = "-" if final.final_val_top1 is None else f"{final.final_val_top1:.4f}"
    click.echo(f"{final.model_path}: val top-1 {top1}, {final.train_seconds / 60:.1f} min of training")


@click.command("analyze")
@click.argument("subject", metavar="ARTIFACT_OR_MODEL")
@click.option("--calib", default=None, metavar="RECIPE|PATH",
              help="Calibration data (default: the artifact's; a MODEL needs it). Labeled data gives top-1 drops.")
@click.option("--calib-recipe", default=None, metavar="NAME", help="Preprocessing recipe for --calib PATH.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=None,
              help="Calibration samples (default: the recipe's, or the artifact's).")
@click.option("--verify-samples", type=click.IntRange(min=1), default=DEFAULT_ANALYZE_SAMPLES, show_default=True,
              help="Held-out samples every figure is measured on.")
@click.option("--seed", type=int, default=None, help="Seed of the calibration subset (default: the recipe's).")
@click.option("--per-tensor", is_flag=True, help="Score layers with per-tensor weight scales (default per-channel).")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Layers in the ranked list.")
@click.option("--test-data", default=None, metavar="PATH",
              help="Also measure FP32 and fake-quant INT8 top-1 on this labeled data (its test split).")
@click.option("--test-limit", type=click.IntRange(min=1), default=None, help="A seeded subset of --test-data.")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--num-classes", type=click.IntRange(min=1), default=None, help="For a zoo MODEL.")
@click.option("--cifar", is_flag=True, default=None, help="For a zoo MODEL: its CIFAR form.")
@click.option("--force", is_flag=True, help="Replace --out.")
def analyze(subject: str, calib: str | None, calib_recipe: str | None, calib_samples: int | None, verify_samples: int,
            seed: int | None, per_tensor: bool, top: int, test_data: str | None, test_limit: int | None, out: Path,
            num_classes: int | None, cifar: bool | None, force: bool) -> None:
    """Per-layer INT8 diagnosis of a model or of the model behind an artifact.

    Weight statistics (3x3 kernel std overall/centre/surrounding, channel range spread,
    kurtosis, max/std), weight and activation SQNR, the damage each layer does quantized
    alone, and a ranked list of layers with the suggested fix. Writes analysis.md,
    analysis.json, weights.png and activations.png into --out.

    \b
    Example:
      deploykit analyze runs/repvgg/model.safetensors --calib ../shared/data/cifar10-jpeg.tar.gz \\
          --calib-samples 512 --test-data ../shared/data/cifar10-jpeg.tar.gz --out reports/analysis/repvgg
    """
    from rich.console import Console

    from deploykit.calib import load_calibration
    from deploykit.errors import UsageError
    from deploykit.files import check_writable
    from deploykit.report.analysis import write_analysis
    from deploykit.quant.analyze import FIXES
    from deploykit.quant.analyze import analyze as run_analysis
    from deploykit.quant.subject import open_subject

    check_writable(out, force=force, kind="dir")
    console = Console(stderr=True)
    with console.status("loading and fusing the model"):
        target = open_subject(subject, num_classes=num_classes, cifar=cifar)
    stored = target.calibration
    data = calib or (stored.get("source") if stored and not stored.get("synthetic") else None)
    if data is None:
        raise UsageError("analyze needs calibration data: pass --calib PATH (labeled folders give top-1 drops)")
    if calib is None and ":" in data and not Path(data).exists():
        data = data.rsplit(":", 1)[0]  # an archive's split is recorded as ARCHIVE:SPLIT
    with console.status("loading calibration data"):
        calibration = load_calibration(
            data, input_size=target.input_size, num_samples=calib_samples or stored.get("count"),
            num_verify=verify_samples, seed=seed if seed is not None else stored.get("seed"),
            recipe=calib_recipe or (stored.get("recipe") if calib is None else None),
        )
    if len(calibration.held_out) == 0:
        raise UsageError("no held-out samples left for the analysis; lower --calib-samples")
    with console.status("measuring every layer, one layer at a time"):
        result = run_analysis(
            target.fused, calibration.inputs, calibration.held_out, labels=calibration.held_out_labels,
            per_channel=not per_tensor, sources=target.sources, train_model=target.train_model, name=target.name,
            calibration_info=calibration.summary(),
        )
    if test_data is not None:
        from deploykit.quant.fakequant import reference_top1

        with console.status(f"FP32 and fake-quant INT8 top-1 on {test_data}"):
            result.reference = reference_top1(target.fused, calibration.inputs, test_data, calibration.preprocessing,
                                              limit=test_limit)
    with console.status("writing"):
        write_analysis(result, out, model=target.fused, inputs=calibration.held_out, force=force, top=top)
    by_name = {layer.name: layer for layer in result.layers}
    for rank, name in enumerate(result.ranking[: min(top, 5)], 1):
        layer = by_name[name]
        click.echo(f"{rank}. {name}: logit SQNR {layer.logit_sqnr_db:.1f} dB -> {FIXES[layer.fix]}")
    click.echo(f"wrote {out}/analysis.md, analysis.json, weights.png, activations.png")
