"""The ``sdtool`` command group: commands load lazily, user errors become one line and exit 2.

Each command lives in its own module under sdtool/cli/ and is imported only when it runs, so
``sdtool scan`` never pays for what ``sdtool convert`` needs (torch above all).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

import click

from sdtool import __version__
from sdtool.errors import SdtoolError
from sdtool.vocab import ExitCode

#: command name -> "module:attribute" of its click command; one line per command.
COMMANDS: dict[str, str] = {
    "inspect": "sdtool.cli.inspect:inspect_cmd",
    "scan": "sdtool.cli.scan:scan_cmd",
    "convert": "sdtool.cli.convert:convert_cmd",
    "prune": "sdtool.cli.prune:prune_cmd",
    "extract": "sdtool.cli.prune:extract_cmd",
    "hash": "sdtool.cli.hash:hash_cmd",
    "diff": "sdtool.cli.diff:diff_cmd",
    "merge": "sdtool.cli.merge:merge_cmd",
    "lora": "sdtool.cli.lora:lora_cmd",
}


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._load(name) is not None]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._load(cmd_name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:  # a command not built yet
                return None
            raise
        cmd = getattr(module, attr, None)
        return cmd if isinstance(cmd, click.Command) else None


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "-V", "--version", prog_name="sdtool")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Inspect, scan, convert and prune Stable Diffusion and PyTorch model files.

    sdtool never runs code from a file: pickles are read by a restricted unpickler that builds
    only data and lazy tensors.

    \b
    Examples:
      sdtool inspect model.ckpt
      sdtool scan downloads/
      sdtool convert model.ckpt model.safetensors --dtype fp16
      sdtool prune model.ckpt model-pruned.safetensors --ema-only
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv: Sequence[str] | None = None) -> int:
    """Run sdtool with ``argv``; return the exit code (0 ok, 1 findings/failures, 2 errors)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        rv = cli.main(args=args, prog_name="sdtool", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("sdtool: interrupted", err=True)
        return ExitCode.INTERRUPTED
    except click.ClickException as e:
        click.echo(_one_line(e), err=True)
        return ExitCode.ERROR
    except click.exceptions.Exit as e:
        return int(e.exit_code or 0)
    except SdtoolError as e:
        if debug:
            raise
        from sdtool.cli.render import error

        error(e)
        return ExitCode.ERROR
    except KeyboardInterrupt:
        click.echo("sdtool: interrupted", err=True)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`| head`): say nothing more, and keep Python's final flush of
        # stdout from failing again at exit
        _silence_stdout()
        return ExitCode.BROKEN_PIPE
    return int(rv or 0)


def _one_line(e: click.ClickException) -> str:
    """A click usage error as one line: ``sdtool: <command>: <problem> (see ...)``."""
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else "sdtool"
    where = path.removeprefix("sdtool").strip()
    prefix = f"sdtool: {where}: " if where else "sdtool: "
    return f"{prefix}{e.format_message()} (see '{path} --help')"


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (tests capture it)
        pass


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
