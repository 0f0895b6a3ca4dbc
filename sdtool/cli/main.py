"""The ``sdtool`` command group: commands load lazily, user errors become one line and exit 2.

Each command lives in its own module under sdtool/cli/ and is imported only when it runs, so
``sdtool scan`` never pays for what ``sdtool convert`` needs (torch above all).
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import re
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
    """A click group whose commands are imported on first use.

    ``sdtool --help`` lists the commands without importing them: each one-line summary is read
    from the first line of its function's docstring in the module's source (import only if that
    fails), so the listing costs a few milliseconds, not the imports of every command.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if _source(name) is not None or self._load(name)]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(map(len, COMMANDS), default=0)
        rows = []
        for name in self.list_commands(ctx):
            summary = _summary(name)
            if summary is None:
                cmd = self._load(name)
                summary = cmd.get_short_help_str(limit) if cmd is not None else ""
            else:
                summary = _short_help(summary, limit)
            rows.append((name, summary))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

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


def _source(name: str) -> str | None:
    """The source text of the module defining command ``name`` (None: not built, or no source)."""
    target = COMMANDS.get(name)
    if target is None:
        return None
    try:
        spec = importlib.util.find_spec(target.split(":")[0])
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        with open(spec.origin, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _summary(name: str) -> str | None:
    """The first paragraph of command ``name``'s docstring, read from source without importing."""
    text = _source(name)
    if text is None:
        return None
    attr = COMMANDS[name].split(":")[1]
    m = re.search(rf"^def {re.escape(attr)}\(.*?\"\"\"(.*?)(?:\n\s*\n|\"\"\")", text, re.S | re.M)
    return " ".join(m.group(1).split()) if m else None


def _short_help(text: str, limit: int) -> str:
    """The first sentence of ``text``, cut at a word boundary to ``limit`` columns (as click)."""
    sentence = text.split(". ", 1)[0].rstrip(".") + "."
    if len(sentence) <= limit:
        return sentence
    words, out = sentence.split(), ""
    for w in words:
        if len(out) + len(w) + 4 > limit:
            break
        out = f"{out} {w}" if out else w
    return out.rstrip(",;:") + "..."


def _versions() -> str:
    """``sdtool X (Python, numpy, safetensors, torch versions)``; nothing of them is imported."""
    parts = [f"sdtool {__version__}", f"Python {sys.version.split()[0]}"]
    for dist in ("numpy", "safetensors", "torch"):
        version = _installed(dist)
        parts.append(f"{dist} {version}" if version else f"{dist} not installed")
    return parts[0] + " (" + ", ".join(parts[1:]) + ")"


def _installed(dist: str) -> str | None:
    """The installed version of ``dist`` from its ``*.dist-info`` folder name on sys.path
    (importlib.metadata reads every distribution's metadata, ten times slower)."""
    import os

    pattern = re.compile(rf"^{re.escape(dist)}-([^-]+)\.dist-info$", re.I)
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            m = pattern.match(name)
            if m:
                return m.group(1)
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(_versions())
        ctx.exit(ExitCode.OK)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "-V",
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the versions of sdtool, Python, numpy, safetensors and torch, and exit.",
)
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors (also after COMMAND).")
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
    args, debug = _take_debug(list(sys.argv[1:] if argv is None else argv))
    if debug:
        args.insert(0, "--debug")
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


def _take_debug(args: list[str]) -> tuple[list[str], bool]:
    """``--debug`` anywhere before ``--`` (``sdtool scan x --debug`` too): removed, and reported."""
    end = args.index("--") if "--" in args else len(args)
    kept = [a for a in args[:end] if a != "--debug"]
    return kept + args[end:], len(kept) != end


def _one_line(e: click.ClickException) -> str:
    """A click usage error as one line: ``sdtool: <command>: <problem> (see ...)``.

    click lays some messages out on several lines (the choices of a missing option, one per
    line; the whole help for a group called without its command): they are folded into one.
    """
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else "sdtool"
    where = path.removeprefix("sdtool").strip()
    prefix = f"sdtool: {where}: " if where else "sdtool: "
    message = " ".join(e.format_message().split())
    if ctx is not None and isinstance(e, _NO_ARGS) and isinstance(ctx.command, click.Group):
        names = ctx.command.list_commands(ctx)
        message = f"missing a command: {', '.join(names[:-1])} or {names[-1]}"
    return f"{prefix}{message} (see '{path} --help')"


#: what click (8.2 on) raises for a group given no command: its message is the whole help
_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (tests capture it)
        pass


def run() -> None:
    """Console-script entry point.

    What is loaded by now (Python, click, the CLI) lives as long as the process: frozen, the
    garbage collector no longer walks it, and the young generation is collected every 10,000
    allocations rather than 700, as the inspect path's imports and its unpickled tensor records
    build many objects and few cycles (~31M instructions of ~1,040M for ``inspect``).
    """
    global _settle_pending
    gc.freeze()
    gc.set_threshold(10_000, *gc.get_threshold()[1:])
    _settle_pending = True
    sys.exit(main())


#: set by run(): the process is the command line's own, not a library's call of main()
_settle_pending = False


def settle() -> None:
    """Freeze what a command has imported for its work (its readers, tables, regexes), as
    run() froze the CLI: once, in the console-script process only, called before the first
    file is read, so nothing built from a file (which may hold cycles) is ever frozen.
    ``inspect --no-cache`` of the 7.7 GB checkpoint: -7M instructions (the collections at exit
    and in between no longer walk the inspect path's modules)."""
    global _settle_pending
    if _settle_pending:
        _settle_pending = False
        gc.freeze()
