"""What every container walker shares: the per-file context (findings, errors, budget) and
the one way to recurse into a member (``Ctx.nested``), plus opening a file safely.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from sdtool.errors import NotRegularFile
from sdtool.scan.buffers import (
    Budget,
    ScanLimit,
)
from sdtool.scan.report import FileScan, Finding, ProblemKind
from sdtool.scan.rules import analyse
from sdtool.scan.vm import (
    DEFAULT_LIMITS,
    Limits,
    Stream,
    run_stream,
)
from sdtool.vocab import Format

MAX_DEPTH = 4  # containers inside containers
MAX_STREAMS = 1000  # pickle streams per member
MAX_MEMBER = 2 << 30  # bytes of one member (stored ones are windows, never copied)
MAX_ORACLE_STREAMS = 5000  # streams per file cross-checked with the C unpickler


@dataclass
class Ctx:
    """Per-file scan state."""

    report: FileScan
    limits: Limits = DEFAULT_LIMITS
    budget: Budget = field(default_factory=Budget)
    keep: list[Any] = field(default_factory=list)  # temporary files and maps to close at the end
    pending: ScanLimit | None = None  # a limit met reading a member: raised once it is scanned
    depth: int = 0  # nesting depth of the container being walked
    crc: str = "read"  # "read": check CRC of members that are read; "all": every member
    formats: list[Format] = field(default_factory=list)
    parsed: dict[str, Stream] = field(default_factory=dict)  # member -> its first stream
    fd: int | None = None  # the top-level file, for scattered reads that should not fault pages
    oracle_runs: int = 0  # streams handed to the C unpickler so far

    def find(self, severity: str, rule: str, message: str, member: str | None, **kw: Any) -> None:
        self.report.add(Finding(severity, rule, message, member, **kw))

    def error(
        self, member: str | None, message: str, kind: ProblemKind = ProblemKind.BROKEN
    ) -> None:
        """A part of the file not analysed (by default: its bytes break their format)."""
        self.report.problem(kind, message, member)

    def nested(self, data: Any, path: str, depth: int | None = None) -> None:
        """Scan ``data`` (a member of the container being walked) like any other blob: the one
        way every walker recurses. ``depth`` defaults to one below the current container."""
        scan_nested(self, data, path, self.depth + 1 if depth is None else depth)


def join_path(parent: str | None, child: str) -> str:
    return f"{parent}/{child}" if parent else child


_SPECIAL = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
)


def _special(mode: int) -> str | None:
    """What a non-regular file is ("a named pipe" ...), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _SPECIAL if test(mode)), "not a regular file")


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading, never blocking on a pipe or touching a device.

    The type is checked before opening (a FIFO blocks ``open`` until a writer comes; opening a
    tape device rewinds it) and again on the open descriptor (the path may have changed).
    """
    what = _special(os.stat(path).st_mode)
    if what is None:
        fd = os.open(
            path,
            os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0),
        )
        if _special(os.fstat(fd).st_mode) is None:
            return os.fdopen(fd, "rb")
        os.close(fd)
        what = "not a regular file"
    raise NotRegularFile(what)


def run_pickle(ctx: Ctx, buf: Any, start: int, end: int, *, oracle: bool = False) -> Stream:
    """One pickle stream through the VM, its opcodes charged to the file's budget (as the bytes
    it walked: every opcode takes at least one). ``oracle``: also through the C unpickler
    (see vm.run_stream)."""
    ctx.budget.check_time()
    if oracle:
        ctx.oracle_runs += 1
        if ctx.oracle_runs > MAX_ORACLE_STREAMS:
            oracle = False
            if ctx.oracle_runs == MAX_ORACLE_STREAMS + 1:
                ctx.report.notes.append(
                    f"streams after the first {MAX_ORACLE_STREAMS} are not cross-checked with "
                    "the C unpickler"
                )
    left = ctx.budget.opcodes_left()
    limits = ctx.limits
    if left < limits.max_opcodes:
        limits = dataclasses.replace(limits, max_opcodes=left)
    s = run_stream(buf, start, end, limits=limits, oracle=oracle)
    ctx.budget.charge_opcodes(max(s.end, s.error_offset, start) - start)
    return s


def record_stream(ctx: Ctx, s: Stream, member: str | None, index: int) -> None:
    ctx.report.streams += 1 + len(s.nested)
    if any(_oracle_failed(sub) for sub in (s, *s.nested)):
        ctx.report.self_contained = False  # the cross-check ran out of time or memory here
    findings, errors = analyse(s, member=member, index=index)
    ctx.report.findings.extend(findings)
    for e in errors:
        ctx.error(member, e, ProblemKind.RULE)
    where = f"stream {index}" if index else "pickle"
    for sub in [s, *s.nested]:
        if sub.error:
            ctx.error(member, f"{where} broken at offset {sub.error_offset}: {sub.error}")
            if any(f.severity == "dangerous" for f in findings):
                ctx.find(
                    "info",
                    "stream-broken",
                    f"{where} breaks at offset {sub.error_offset} after its payload: the loader "
                    "runs what comes before the break",
                    member,
                    stream=index,
                    offset=sub.error_offset,
                )
        if sub.incomplete:
            ctx.error(
                member,
                f"{where} analysis stopped at offset {sub.error_offset}: {sub.incomplete}",
                ProblemKind.STOPPED,
            )


def _oracle_failed(s: Stream) -> bool:
    """Whether the C-unpickler cross-check of ``s`` failed for a reason of the moment (out
    of time or memory, a crash), not for good (no fork on this platform)."""
    if s.oracle is None or not s.oracle.failed:
        return False
    from sdtool.scan.oracle import NO_FORK

    return bool(s.oracle.failed != NO_FORK)


def scan_nested(ctx: Ctx, data: Any, path: str, depth: int) -> None:
    from sdtool.scan.containers import scan_blob  # the router (imports every walker)

    before = len(ctx.formats)
    scan_blob(ctx, data, path, depth=depth)
    del ctx.formats[before:]  # only the outermost format names the file
