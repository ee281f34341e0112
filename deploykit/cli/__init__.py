"""Command line: parse, call the library, map errors to exit codes. Nothing else.

Subcommands live in small modules and are imported only when invoked, so
``deploykit --help`` stays fast and works with no optional backend installed.
"""
from __future__ import annotations

import importlib
import logging
import sys

import click

from deploykit import __version__
from deploykit.errors import DeployError, one_line

# command name -> "module:attribute"; a module is imported only when its command runs.
COMMANDS: dict[str, str] = {
    "models": "deploykit.cli.zoo:models",
    "fuse": "deploykit.cli.zoo:fuse",
    "export": "deploykit.cli.zoo:export",
    "build": "deploykit.cli.build:build",
    "advise": "deploykit.cli.advise:advise",
    "eval": "deploykit.cli.build:evaluate",
    "targets": "deploykit.cli.build:targets",
    "bench": "deploykit.cli.bench:bench",
    "report": "deploykit.cli.bench:report",
    "fleet": "deploykit.cli.fleet:fleet",
    "doctor": "deploykit.cli.doctor:doctor",
    "train": "deploykit.cli.train:train",
    "analyze": "deploykit.cli.train:analyze",
    "package": "deploykit.cli.package:package",
    "verify": "deploykit.cli.package:verify",
    "run": "deploykit.cli.package:run",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deploykit")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug logs).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """deploykit: PyTorch vision models to fused, exported, quantized, verified artifacts.

    \b
    Example:
      deploykit build repvgg_a0 --target openvino --precision int8 --calib data/cifar10/train
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _message(err: DeployError) -> str:
    """A user error in one line (two at most): the extra lines of a multi-line message are dropped."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "\n".join(lines[:2]) or type(err).__name__


def _is_validation_error(err: Exception) -> bool:
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(err, pydantic.ValidationError)


def _validation_message(err: Exception) -> str:
    first = err.errors()[0]  # type: ignore[attr-defined]
    where = ".".join(str(p) for p in first.get("loc", ())) or "(top level)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""  # type: ignore[attr-defined]
    return f"{err.title}: {where}: {first.get('msg', '')}{more}"  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    from deploykit.privacy import private_caches

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    private_caches()
    try:
        cli.main(args=args, prog_name="deploykit", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(2 if isinstance(err, click.UsageError) else err.exit_code)
    except DeployError as err:
        if debug:
            raise
        click.echo(f"error: {_message(err)}", err=True)
        sys.exit(err.exit_code)
    except OSError as err:  # the environment refused (permissions, a file where a folder goes, disk full)
        if debug:
            raise
        where = f"{err.filename}: " if err.filename else ""
        click.echo(f"error: {where}{err.strerror or one_line(err)}", err=True)
        sys.exit(1)
    except Exception as err:
        if debug or not _is_validation_error(err):
            raise
        click.echo(f"error: {_validation_message(err)}", err=True)  # a file deploykit reads failed its schema
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(0)


if __name__ == "__main__":
    main()
