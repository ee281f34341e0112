"""`deploykit package`, `deploykit verify`, `deploykit run`: edge-device bundles."""
from __future__ import annotations

import json
from pathlib import Path

import click

from deploykit.cli.options import THREADS


def _labels(value: str | None) -> list[str] | None:
    """--labels: a text file (one per line), a data folder/.tar.gz (its class folders), or a,b,c."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file() and path.suffix in (".txt", ".labels", ""):
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if path.exists():
        from deploykit.calib import open_source
        from deploykit.errors import DeployError

        classes = open_source(str(path), "train").classes
        if not classes:
            raise DeployError(f"{value} has no class folders to take labels from")
        return list(classes)
    return [part.strip() for part in value.split(",") if part.strip()]


@click.command("package")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Bundle file NAME.tar.gz.")
@click.option("--labels", default=None, metavar="FILE|DATA|a,b,c",
              help="Class labels: a text file (one per line), an image-folder tree or .tar.gz (its class "
                   "folders), or a comma-separated list. Default: the build's, else class_0...")
@click.option("--golden", "golden_count", type=click.IntRange(min=1), default=8, show_default=True,
              help="Golden self-test inputs (seeded).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the golden inputs.")
@click.option("--threads", type=THREADS, default=None, help="Runtime threads (default: the build's).")
@click.option("--latency", "measure_latency", is_flag=True,
              help="Measure latency here and record it as the bundle's band (package on the device class itself).")
@click.option("--force", is_flag=True, help="Replace an existing bundle file.")
def package(artifact: Path, out: Path, labels: str | None, golden_count: int, seed: int, threads: int | None,
            measure_latency: bool, force: bool) -> None:
    """Package a built ARTIFACT directory as one self-checking bundle for a device.

    The bundle holds the model files, manifest.json (checksums, preprocessing, labels,
    versions, verification figures), golden inputs/outputs, a standalone runner that needs
    only numpy and the runtime, and a README.

    \b
    Example:
      deploykit build repvgg_a0 --cifar --num-classes 10 --target rpi5-mnn-int8 --out build/a0-pi
      deploykit package build/a0-pi --out a0-pi.tar.gz --labels ../shared/data/cifar10-jpeg.tar.gz
    """
    from deploykit.package import package_artifact

    result = package_artifact(artifact, out, force=force, labels=_labels(labels), golden_count=golden_count,
                              seed=seed, threads=threads, measure_latency=measure_latency)
    m = result.manifest
    click.echo(f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB): {m.model} {m.backend} {m.precision}, "
               f"{len(m.files) + 1} files, {m.golden.count} golden inputs, labels {m.labels_source}")
    if m.latency:
        click.echo(f"latency band {m.latency.band_ms[0]:.3f}-{m.latency.band_ms[1]:.3f} ms ({m.latency.source})")
    click.echo(f"sha256 {result.sha256}")


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--latency", is_flag=True, help="Also measure latency against the band recorded in the bundle.")
@click.option("--threads", type=THREADS, default=None, help="Runtime threads (default: the bundle's).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(bundle: Path, latency: bool, threads: int | None, as_json: bool) -> None:
    """Check a BUNDLE (.tar.gz or extracted directory): checksums, schema, runtime version, golden outputs.

    Exits 1 on a changed file or unsafe archive, 3 when the golden outputs (or, with
    --latency, the median latency on the recording device) are outside the bundle's bounds.

    \b
    Example:
      deploykit verify a0-pi.tar.gz --latency
    """
    from deploykit.package import verify_bundle

    report = verify_bundle(bundle, latency=latency, threads=threads)
    m, c = report.manifest, report.comparison
    if as_json:
        click.echo(json.dumps({"bundle": str(bundle), "passed": True, "files_checked": report.files_checked,
                               "runtime": f"{m.backend} {report.installed_version}", "golden": c,
                               "latency": report.latency, "warnings": report.warnings}, indent=2))
        return
    click.echo(f"{bundle}: {m.model} {m.backend} {m.precision} (built with {m.runtime.version}, "
               f"here {report.installed_version})")
    click.echo(f"  {report.files_checked} files: checksums ok")
    click.echo(f"  golden: {c['samples']} inputs, cosine min {c['cosine_min']:.6f}, max rel error "
               f"{c['max_rel_error']:.3g}, top-1 agreement {c['top1_agreement']:.3f}")
    if report.latency:
        click.echo(f"  latency: median {report.latency['median_ms']:.3f} ms ({report.latency['band']})")
    for text in report.warnings:
        click.echo(f"warning: {text}", err=True)
    click.echo("verified")


@click.command("run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--topk", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--threads", type=THREADS, default=None, help="Runtime threads (default: the bundle's).")
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
def run(bundle: Path, images: tuple[Path, ...], topk: int, threads: int | None, as_json: bool) -> None:
    """Classify IMAGES with a BUNDLE's model, preprocessing and labels; print the top-k.

    \b
    Example:
      deploykit run a0-pi.tar.gz cat.jpg dog.png --topk 3
    """
    from deploykit.package import run_bundle

    predictions = run_bundle(bundle, list(images), topk=topk, threads=threads)
    if as_json:
        click.echo(json.dumps([{"image": p.image, "top": p.top} for p in predictions], indent=2))
        return
    for p in predictions:
        click.echo(p.image)
        for label, prob in p.top:
            click.echo(f"  {prob:.4f}  {label}")
