"""Options several commands share, defined once so they are spelled and explained the same.

``--json`` always means one JSON document on stdout (schema in docs/<command>.md) with warnings
and progress on stderr; ``--overwrite``, ``--verify``, ``--dtype``, ``--key``, ``--dry-run`` and
``--on-overflow`` mean the same thing wherever they appear. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from sdtool.vocab import DTYPE_NAMES, KEEP

F = TypeVar("F", bound=Callable[..., Any])


class DTypeParam(click.ParamType):
    """A floating dtype to cast to, by any name sdtool knows; converts to the canonical name."""

    name = "dtype"

    def __init__(self, *, keep: bool = False) -> None:
        self.keep = keep
        self.names = ([KEEP] if keep else []) + list(DTYPE_NAMES)

    def get_metavar(self, param: click.Parameter, *args: Any, **kwargs: Any) -> str:
        return "[" + "|".join(self.names) + "]"

    def shell_complete(
        self, ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[Any]:
        """The dtype names, for shell completion."""
        from click.shell_completion import CompletionItem

        return [CompletionItem(n) for n in self.names if n.startswith(incomplete.lower())]

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from sdtool import dtypes
        from sdtool.errors import UnsupportedDtype

        text = str(value).strip()
        if text.lower() in self.names:
            return text.lower()
        try:
            code = dtypes.parse(text).code
        except UnsupportedDtype:
            code = None
        for name, c in DTYPE_NAMES.items():
            if c == code:
                return name
        self.fail(f"{text!r} is not a dtype sdtool casts to; use one of {', '.join(self.names)}")


class PathOrUrl(click.Path):
    """A file argument that may also be a URL (https://, http://, hf://), kept whole as a
    ``sdtool.urls.UrlPath`` (a plain Path would drop a slash)."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from sdtool.urls import UrlPath, is_url

        if isinstance(value, str) and is_url(value):
            return UrlPath(value)
        return super().convert(value, param, ctx)


def _apply(f: F, *decorators: Callable[[F], F]) -> F:
    for d in reversed(decorators):
        f = d(f)
    return f


def json_option(command: str, what: str = "JSON") -> Callable[[F], F]:
    """``--json``: one JSON document on stdout, nothing else there."""
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help=f"Print {what} on stdout (schema: docs/{command}.md).",
    )


def dtype_option(*, keep: bool = False) -> Callable[[F], F]:
    """``--dtype``: cast floating tensors; integers and bools never change."""
    return click.option(
        "--dtype",
        type=DTypeParam(keep=keep),
        default="keep" if keep else None,
        show_default=keep,
        help="Cast floating tensors, exactly as torch's .to() (integers and bools are never cast).",
    )


def key_option(what: str) -> Callable[[F], F]:
    """``--key``: the dotted path of the tensors to use instead of the state dict."""
    return click.option(
        "--key", metavar="PATH", help=f"{what} the tensors under this dotted key, not state_dict."
    )


def write_options(f: F) -> F:
    """``--overwrite``, ``--verify`` and ``--on-overflow``: what every command that writes takes."""
    return _apply(
        f,
        click.option("--overwrite", is_flag=True, help="Replace the output if it exists."),
        click.option(
            "--verify",
            is_flag=True,
            help="Re-read the output and compare every tensor bit for bit.",
        ),
        click.option(
            "--on-overflow",
            type=click.Choice(["fail", "warn"]),
            default="fail",
            show_default=True,
            help="A cast that turns finite values into inf: refuse, or write and warn.",
        ),
    )


def dry_run_option(f: F) -> F:
    """``--dry-run``: print the plan, write nothing."""
    return click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")(f)


def jobs_option(what: str) -> Callable[[F], F]:
    """``-j/--jobs``: how many files at once."""
    return click.option(
        "-j",
        "--jobs",
        type=click.IntRange(1, 64),
        default=1,
        show_default=True,
        help=f"{what} this many files at once.",
    )


def quiet_option(what: str) -> Callable[[F], F]:
    """``-q/--quiet``: print less (what exactly, each command says); errors still on stderr."""
    return click.option("-q", "--quiet", is_flag=True, help=f"Quiet: {what}.")


def complete_from(choices: Any) -> Callable[[click.Context, click.Parameter, str], list[Any]]:
    """A shell-completion callback offering ``choices`` (a list, or a callable returning one)
    for options that take free text (``--drop vae,unet``) but have known values."""

    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
        from click.shell_completion import CompletionItem

        values = choices() if callable(choices) else choices
        done, _, last = incomplete.rpartition(",")
        prefix = f"{done}," if done else ""
        return [CompletionItem(prefix + v) for v in values if v.startswith(last)]

    return complete


def jsonl_option(f: F) -> F:
    """``--jsonl``: one JSON object per file on stdout, written whole as each file finishes."""
    return click.option(
        "--jsonl",
        "as_jsonl",
        is_flag=True,
        help="Print one JSON object per file as it finishes (JSON Lines; docs/scale.md).",
    )(f)


def cache_options(f: F) -> F:
    """``--cache DIR`` / ``--no-cache``: the result cache (default: the user's cache folder)."""
    return _apply(
        f,
        click.option(
            "--cache",
            "cache_dir",
            type=click.Path(path_type=Path, file_okay=False),
            metavar="DIR",
            help="Result cache folder (default: $SDTOOL_CACHE_DIR or ~/.cache/sdtool).",
        ),
        click.option("--no-cache", is_flag=True, help="Neither read nor write the result cache."),
    )


def cluster_option(f: F) -> F:
    """``--cluster ADDRESS``: run the files as tasks on a Dask cluster (``local``: start one)."""
    return click.option(
        "--cluster",
        metavar="ADDRESS",
        help="Run each file as a task on the Dask scheduler at ADDRESS (tcp://host:8786), or "
        "'local' to start a local cluster (needs sdtool[cluster]; docs/scale.md).",
    )(f)


def resume_option(f: F) -> F:
    """``--resume``: skip the outputs an earlier run wrote and recorded, unchanged since."""
    return click.option(
        "--resume",
        is_flag=True,
        help="Skip outputs an earlier run wrote (recorded in the cache) and unchanged since; "
        "redo any other existing output.",
    )(f)


def batch_options(*, cluster: bool = False) -> Callable[[F], F]:
    """What batch writers share: ``--jsonl``, ``--resume``, the cache and maybe ``--cluster``."""

    def apply(f: F) -> F:
        extra = (cluster_option,) if cluster else ()
        return _apply(f, jsonl_option, resume_option, cache_options, *extra)

    return apply
