"""Thin click commands; heavy imports stay inside the command bodies.

Exit codes: 0 ok, 2 bad input (config, paths, unsupported or corrupt model, output folder held
by another run), 1 internal failure, 130 interrupted (SIGINT or SIGTERM, after cleanup).
"""
from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import click

from compress import __version__

BAD_INPUT = 2
FAILURE = 1


def _setup_logging(verbose: int, quiet: bool) -> None:
    from compress.progress import set_enabled

    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    set_enabled(not quiet)


def _bad_input(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(BAD_INPUT)


def _input_errors() -> tuple[type[BaseException], ...]:
    from compress.config import ConfigError
    from compress.models.arch import UnsupportedModelError
    from compress.models.checkpoint import CheckpointError
    from compress.lock import OutputBusy

    return (ConfigError, CheckpointError, UnsupportedModelError, FileNotFoundError, OutputBusy)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (kill, systemd, docker stop) cleans up like Ctrl-C


def _load(config: str, overrides: tuple[str, ...]):
    from compress.config import load_config

    try:
        return load_config(config, list(overrides))
    except _input_errors() as e:
        _bad_input(str(e))


@click.group()
@click.version_option(__version__, prog_name="compress")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and the final table only; no progress bars.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Quantize a causal language model, export it, and measure what it cost."""
    _setup_logging(verbose, quiet)


def _run(config: str, overrides: tuple[str, ...], output: str | None) -> None:
    cfg = _load(config, overrides)
    from compress.pipeline import run

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        ctx = run(cfg, Path(output) if output else None)
    except _input_errors() as e:
        _bad_input(str(e))
    except KeyboardInterrupt:
        click.echo("interrupted: no partial artifact was left in place", err=True)
        sys.exit(130)
    except Exception as e:  # internal failure: say what, keep the traceback for -v
        logging.getLogger("compress").debug("traceback", exc_info=True)
        click.echo(f"failed: {type(e).__name__}: {e}", err=True)
        sys.exit(FAILURE)
    finally:
        signal.signal(signal.SIGTERM, previous)  # for callers in this process (tests)
    _print_how_to_load(ctx)


def _print_how_to_load(ctx) -> None:
    """The two lines that load each finished artifact, and what they need installed."""
    from compress.formats.registry import get_format

    done = [r.artifact for r in ctx.candidates.values() if r.artifact is not None]
    if not done:
        return
    fmt = get_format(ctx.cfg.export.format)
    click.echo(f"\nLoad an artifact ({fmt.name}; needs {fmt.loaders}):")
    for path in done:
        p = json.dumps(str(Path(path).resolve()))
        click.echo("    from transformers import AutoModelForCausalLM, AutoTokenizer")
        click.echo(f"    model, tokenizer = AutoModelForCausalLM.from_pretrained({p}), AutoTokenizer.from_pretrained({p})")


_SET = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                    help="Override a config value before validation (repeatable).")
_OUT = click.option("--output", type=click.Path(file_okay=False), default=None,
                    help="Output folder (overrides export.output_dir).")


@main.command("run")
@click.argument("config", type=click.Path(dir_okay=False))
@_SET
@_OUT
def run_cmd(config: str, overrides: tuple[str, ...], output: str | None) -> None:
    """Run the stages of CONFIG: load, calibrate, quantize, export, evaluate, report."""
    _run(config, overrides, output)


@main.command("compare")
@click.argument("config", type=click.Path(dir_okay=False))
@_SET
@_OUT
def compare_cmd(config: str, overrides: tuple[str, ...], output: str | None) -> None:
    """Run every candidate of CONFIG (`candidates:` and/or `sweep:`) and compare them.

    The same as `run`; the output folder gets comparison.json/.csv/.md, PNG plots and a
    self-contained report.html, and the table and a recommendation (`select:`) are printed.
    """
    _run(config, overrides, output)


@main.command("validate")
@click.argument("config", type=click.Path(dir_okay=False))
@_SET
def validate_cmd(config: str, overrides: tuple[str, ...]) -> None:
    """Check CONFIG without running anything."""
    cfg = _load(config, overrides)
    from compress.pipeline import preflight

    try:
        plans = preflight(cfg, Path(cfg.export.output_dir))
    except _input_errors() as e:
        _bad_input(str(e))
    click.echo(f"ok: {len(plans)} candidate(s): {', '.join(p.name for p in plans)}")


@main.command("schema")
def schema_cmd() -> None:
    """Print the JSON Schema of the config (for editors)."""
    from compress.config import RunConfig

    click.echo(json.dumps(RunConfig.model_json_schema(), indent=2))


@main.command("inspect")
@click.argument("path", type=click.Path(exists=True))
def inspect_cmd(path: str) -> None:
    """Architecture, parameters, bytes, bits per weight and quantization of PATH."""
    from compress.inspect import describe

    try:
        click.echo(describe(Path(path)))
    except _input_errors() as e:
        _bad_input(str(e))


def _register_optional() -> None:
    try:
        from compress.publish.command import publish
    except ImportError:  # the publish extra is not installed
        return
    main.add_command(publish)


_register_optional()


if __name__ == "__main__":
    main()
