"""Thin click commands; heavy imports stay inside the command bodies.

Exit codes: 0 ok; 2 bad input (config, paths, unsupported or corrupt model, a full or read-only
disk, an output folder another live run holds), reported as one `error: ...` line naming the
key path or file; 1 an internal failure, reported as one `failed: ...` line (a traceback only
under `--debug`); 130 interrupted (SIGINT or SIGTERM, after cleanup).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import signal
import sys
import traceback
from pathlib import Path
from typing import Optional

import click

from compress import __version__

BAD_INPUT = 2
FAILURE = 1
INTERRUPTED = 130

# OS errors that a user fixes (a path, a permission, the disk), not failures of ours.
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _Formatter(logging.Formatter):
    """A logged exception (`log.exception`) shows as one line; its traceback only under --debug."""

    def __init__(self, debug: bool):
        super().__init__(_LOG_FORMAT)
        self.debug = debug

    def formatException(self, ei) -> str:
        if self.debug:
            return super().formatException(ei)
        return f"  {ei[0].__name__}: {_one_line(ei[1])} (--debug shows the traceback)"


def _setup_logging(verbose: int, quiet: bool, debug: bool) -> None:
    from compress.progress import set_enabled

    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 or debug else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(debug))
    logging.basicConfig(level=level, handlers=[handler])
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    set_enabled(not quiet)


def _one_line(msg: object) -> str:
    """A message as one line: several lines (e.g. one per config error) are joined with '; '."""
    return "; ".join(line.strip() for line in str(msg).splitlines() if line.strip())


def _bad_input(msg: str) -> None:
    click.echo(f"error: {_one_line(msg)}", err=True)
    sys.exit(BAD_INPUT)


def _under(path: str, folder: Path) -> bool:
    try:
        Path(path).absolute().relative_to(folder.absolute())
        return True
    except ValueError:
        return False


def _bad_input_message(e: Exception, out_dir: Optional[Path]) -> Optional[str]:
    """What to tell the user when `e` is bad input; None when it is a failure of ours."""
    from compress.config import ConfigError
    from compress.lock import OutputBusy
    from compress.models.arch import UnsupportedModelError
    from compress.models.checkpoint import CheckpointError

    if isinstance(e, (ConfigError, CheckpointError, UnsupportedModelError, OutputBusy)):
        return str(e)
    if not isinstance(e, OSError) or not (isinstance(e, _USER_OS_ERRORS) or e.errno in _USER_ERRNOS):
        return None
    if e.filename is None:
        return str(e)
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    msg = f"{where}: {e.strerror}"
    return f"export.output_dir: {msg}" if out_dir is not None and _under(str(e.filename), out_dir) else msg


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("debug"))


@contextlib.contextmanager
def _exit_codes(out_dir: Optional[Path] = None):
    """The exit-code contract around a command's work; `out_dir`: the run's output folder, so
    that a full or read-only disk there is reported against `export.output_dir`."""
    try:
        yield
    except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        raise
    except KeyboardInterrupt:
        click.echo("interrupted: no partial artifact was left in place; run again with --resume to "
                   "continue from the last finished block", err=True)
        sys.exit(INTERRUPTED)
    except Exception as e:
        msg = _bad_input_message(e, out_dir)
        if msg is not None:
            _bad_input(msg)
        if _debug():
            traceback.print_exc()
        hint = "" if _debug() else " (--debug shows the traceback)"
        click.echo(f"failed: {type(e).__name__}: {_one_line(e)}{hint}", err=True)
        sys.exit(FAILURE)


@click.group()
@click.version_option(__version__, prog_name="compress")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and the final table only; no progress bars.")
@click.option("--debug", is_flag=True, help="Debug logging, and the traceback of an internal failure.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool, debug: bool) -> None:
    """Quantize a causal language model, export it, and measure what it cost."""
    _setup_logging(verbose, quiet, debug)


def _run(config: str, overrides: tuple[str, ...], output: str | None, resume: bool = False) -> None:
    from compress.config import load_config

    with _exit_codes():
        cfg = load_config(config, list(overrides))
    out_dir = Path(output or cfg.export.output_dir)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with _exit_codes(out_dir):
            from compress.pipeline import run

            ctx = run(cfg, out_dir, resume=resume)
    finally:
        signal.signal(signal.SIGTERM, previous)  # for callers in this process (tests)
    _print_how_to_load(ctx)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (kill, systemd, docker stop) cleans up like Ctrl-C


def _print_how_to_load(ctx) -> None:
    """The two lines that load each finished artifact, and what they need installed."""
    from compress.formats.registry import get_format

    done = [r.artifact for r in ctx.candidates.values() if r.artifact is not None]
    if not done:
        return
    fmt = get_format(ctx.cfg.export.format)
    click.echo(f"\nLoad an artifact ({fmt.name}; needs {fmt.loaders}):")
    for path in done:
        for line in fmt.how_to_load(Path(path).resolve()):
            click.echo("    " + line)


_SET = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                    help="Override a config value before validation (repeatable).")
_RESUME = click.option("--resume", is_flag=True,
                       help="Continue an interrupted run on the same output folder from its last finished block.")
_OUT = click.option("--output", type=click.Path(file_okay=False), default=None,
                    help="Output folder (overrides export.output_dir).")


@main.command("run")
@click.argument("config", type=click.Path())
@_SET
@_OUT
@_RESUME
def run_cmd(config: str, overrides: tuple[str, ...], output: str | None, resume: bool) -> None:
    """Run the stages of CONFIG: load, calibrate, quantize, export, evaluate, report."""
    _run(config, overrides, output, resume)


@main.command("compare")
@click.argument("config", type=click.Path())
@_SET
@_OUT
@_RESUME
@click.option("--ray", "ray_address", metavar="auto|local|ADDRESS", default=None,
              help="Run each candidate as a Ray task on this cluster (executor.kind: ray, executor.address); "
              "needs pip install 'compress[ray]'.")
def compare_cmd(config: str, overrides: tuple[str, ...], output: str | None, resume: bool,
                ray_address: Optional[str]) -> None:
    """Run every candidate of CONFIG (`candidates:` and/or `sweep:`) and compare them.

    The same as `run`; the output folder gets comparison.json/.csv/.md, PNG plots and a
    self-contained report.html, and the table and a recommendation (`select:`) are printed.
    With --ray, candidates run as Ray tasks (docs/ray.md).
    """
    if ray_address is not None:
        from compress.executor.ray_run import require_ray

        with _exit_codes():
            require_ray("--ray")
        overrides = (*overrides, "executor.kind=ray", f"executor.address={json.dumps(ray_address)}")
    _run(config, overrides, output, resume)


@main.command("validate")
@click.argument("config", type=click.Path())
@_SET
def validate_cmd(config: str, overrides: tuple[str, ...]) -> None:
    """Check CONFIG without running anything."""
    from compress.config import load_config

    with _exit_codes():
        cfg = load_config(config, list(overrides))
        from compress.pipeline import preflight

        plans = preflight(cfg, Path(cfg.export.output_dir))
    click.echo(f"ok: {len(plans)} candidate(s): {', '.join(p.name for p in plans)}")


@main.command("schema")
def schema_cmd() -> None:
    """Print the JSON Schema of the config (for editors)."""
    from compress.config import RunConfig

    click.echo(json.dumps(RunConfig.model_json_schema(), indent=2))


@main.command("inspect")
@click.argument("path", type=click.Path())
def inspect_cmd(path: str) -> None:
    """Architecture, parameters, bytes, bits per weight and quantization of PATH."""
    with _exit_codes():
        from compress.inspect import describe

        click.echo(describe(Path(path)))


@main.command("generate")
@click.argument("artifact", type=click.Path())
@click.option("--prompt", required=True, help="The text to continue (with --chat: the user's message).")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(min=0),
              help="0 is greedy.")
@click.option("--top-k", default=40, show_default=True, type=click.IntRange(min=0), help="0: no top-k cut.")
@click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--chat", is_flag=True, help="Apply the tokenizer's chat template (one user turn).")
@click.option("--device", default="cpu", show_default=True)
def generate_cmd(artifact: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                 seed: int, chat: bool, device: str) -> None:
    """Stream text from ARTIFACT (a folder compress wrote, or a float model folder) on the
    fastest runtime for it; the speed and the runtime are said on stderr at the end."""
    with _exit_codes():
        import torch

        from compress.models.checkpoint import CheckpointError
        from compress.runtime.generate import Sampling, TextStream, Timing, generate, prompt_ids, stop_ids
        from compress.runtime.registry import kind_of, open_decoder

        path = Path(artifact)
        kind_of(path)  # a bad path or format: exit 2 before anything heavy loads
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: no tokenizer compress can load ({_one_line(e)[:200]})") from None
        ids = prompt_ids(tok, prompt, chat, str(path))
        decoder = open_decoder(path, torch.device(device))
        stream, timing = TextStream(tok), Timing()
        sampling = Sampling(temperature, top_k, top_p, seed)
        for t in generate(decoder, ids, max_new_tokens, sampling, stop_ids(tok, path), timing):
            click.echo(stream.push(t), nl=False)
            sys.stdout.flush()
        click.echo("")
        decode = timing.new_tokens / timing.decode_s if timing.decode_s > 0 else float("nan")
        click.echo(f"[{timing.prompt_tokens} prompt + {timing.new_tokens} new tokens"
                   f"{', stopped at EOS' if timing.stopped_at_eos else ''}; prefill "
                   f"{timing.prompt_tokens / max(timing.prefill_s, 1e-9):.0f} tok/s, decode {decode:.1f} tok/s; "
                   f"runtime: {decoder.label}]", err=True)


def _register_optional() -> None:
    try:
        from compress.publish.command import publish
    except ImportError:  # the publish extra is not installed
        return
    main.add_command(publish)


_register_optional()


if __name__ == "__main__":
    main()
