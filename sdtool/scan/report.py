"""Result objects of a scan: pure data, no printing. ``to_json`` gives the documented schema."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any, ClassVar

from sdtool import errors as err
from sdtool.results import JsonKey, Result, json_key
from sdtool.vocab import ExitCode, Format, Severity, Verdict

#: a file a verdict depends on: its name beside the scanned file, and its identity (device,
#: inode, size, mtime_ns, ctime_ns) when it was read, or None when it was absent
Dependency = tuple[str, tuple[int, ...] | None]
#: per-file verdicts, worst first
VERDICTS = tuple(Verdict)
SCHEMA_VERSION = "sdtool.scan/2"


def utf8_safe(obj: Any) -> Any:
    """``obj`` (JSON data) with every string encodable as UTF-8.

    Names from files and file systems may hold bytes that are not UTF-8 (a tar member name, a
    file name on disk): Python carries them as lone surrogates, which no UTF-8 output accepts.
    They are written as ``\\xNN`` (an undecodable byte) or ``\\uNNNN`` escapes instead, so
    ``--json`` and ``--sarif`` stay valid UTF-8 whatever the names hold.
    """
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
            return obj
        except UnicodeEncodeError:
            return "".join(_escape_surrogate(c) for c in obj)
    if isinstance(obj, dict):
        return {utf8_safe(k): utf8_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [utf8_safe(v) for v in obj]
    return obj


def _escape_surrogate(c: str) -> str:
    n = ord(c)
    if 0xDC80 <= n <= 0xDCFF:  # surrogateescape: the undecodable byte n - 0xDC00
        return f"\\x{n - 0xDC00:02x}"
    return f"\\u{n:04x}" if 0xD800 <= n <= 0xDFFF else c


@dataclass(frozen=True)
class Finding(Result):
    """One thing worth reporting, located as precisely as the container allows."""

    severity: str  # "dangerous" | "suspicious" | "info"
    rule: str  # stable rule id, e.g. "global", "unresolved-global", "zip-crc"
    message: str
    member: str | None = None  # path inside the container ("archive/data.pkl"); None: the file
    stream: int | None = None  # index of the pickle stream within the member
    offset: int | None = None  # byte offset of the opcode within the member (or file)
    #: "module.qualname" as the unpickler resolves it
    global_name: str | None = field(default=None, metadata=json_key("global"))
    usage: str | None = None  # "called via REDUCE", "only imported", ...


class ProblemKind(str, Enum):
    """Why a file, or a part of it, went unanalysed (one ``Problem``)."""

    MISSING = "missing"  # no such file or directory
    NOT_SCANNED = "not_scanned"  # the file or a member was not read at all (empty, encrypted)
    UNREADABLE = (
        "unreadable"  # the file could not be opened or read here (permissions, I/O, a pipe)
    )
    UNSUPPORTED = "unsupported"  # an archive or compression sdtool cannot open
    BROKEN = "broken"  # the bytes break their format: the rest of that part is not analysed
    STOPPED = "stopped"  # the pickle model stopped short (a stream limit): the rest is not
    LIMIT = "limit"  # the file's byte / opcode / nesting budget ran out
    RESOURCES = "resources"  # this machine's time or memory for the file ran out
    CRASH = "crash"  # the scanner process, or the cluster task, died on the file
    RULE = "rule"  # a scan rule crashed on a stream

    def __str__(self) -> str:
        return self.value

    __hash__ = str.__hash__

    @property
    def reproducible(self) -> bool:
        """Whether the file's bytes (and the ruleset) decide this problem, so that scanning the
        same bytes again gives it again: a cached "could not scan" (sdtool.scan.cached). The
        others depend on the machine or the moment: a missing or unreadable file, time or
        memory running out, a killed worker, a rule that crashed."""
        return self in REPRODUCIBLE


#: the problems the bytes decide (truncated, corrupt, over a content limit, unsupported)
REPRODUCIBLE = frozenset(
    {
        ProblemKind.NOT_SCANNED,
        ProblemKind.UNSUPPORTED,
        ProblemKind.BROKEN,
        ProblemKind.STOPPED,
        ProblemKind.LIMIT,
    }
)


#: the scan exceptions that end (part of) a file's scan -> their kind (others: BROKEN)
_EXC_KIND: tuple[tuple[type[err.SdtoolError], ProblemKind], ...] = (
    (err.ScanOutOfResources, ProblemKind.RESOURCES),
    (err.ScanLimit, ProblemKind.LIMIT),
    (err.ScanWorkerDied, ProblemKind.CRASH),
    (err.NotRegularFile, ProblemKind.UNREADABLE),
    (err.UnsupportedArchive, ProblemKind.UNSUPPORTED),
)


@dataclass(frozen=True)
class Problem:
    """One reason (part of) a file was not analysed: typed, with the sentence ``--json`` shows
    under ``errors`` (the member first: ``"data.pkl: stream 1 broken at offset 9: ..."``)."""

    kind: ProblemKind
    message: str
    member: str | None = None

    @classmethod
    def of(cls, e: err.SdtoolError, member: str | None = None) -> Problem:
        """The problem a scan exception stands for (its kind by its class)."""
        kind = next((k for t, k in _EXC_KIND if isinstance(e, t)), ProblemKind.BROKEN)
        return cls(kind, f"{member}: {e.message}" if member else e.message, member)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class FileReport(Result):
    """What the scan found in one file (frozen: a scan builds it in a ``FileScan``)."""

    JSON_KEYS: ClassVar[tuple[JsonKey, ...]] = (
        "path", "format", "size", "verdict", "scanned", "skipped", "streams", "findings",
        "errors", "notes",
    )  # fmt: skip

    path: str
    format: Format = Format.UNKNOWN
    findings: tuple[Finding, ...] = ()
    problems: tuple[Problem, ...] = ()  # what kept parts unanalysed (JSON: ``errors``)
    notes: tuple[str, ...] = ()
    scanned: bool = True  # False: nothing in the file could be analysed ("not scanned")
    streams: int = 0  # pickle streams analysed
    size: int = 0
    sha256: str | None = None  # hex, when the batch computed it (--jsonl --sha256; not in JSON)
    cached: bool = False  # the verdict came from the result cache (not in JSON)
    skipped: str | None = None  # "PNG image", ...: by content not a model file (counted, exit 0)
    #: False: the verdict depends on more than the file's bytes and ``depends`` (an optional
    #: reader not installed here, a cross-check that ran out of time), so it is never cached
    #: (not in JSON)
    self_contained: bool = True
    #: the files beside this one whose bytes the verdict also depends on (joblib side files):
    #: (the name the pickle gives, relative to this file's folder; their identity when read, or
    #: None: absent); a cached verdict holds while they are unchanged (not in JSON)
    depends: tuple[Dependency, ...] = ()

    @property
    def errors(self) -> list[str]:
        """The problems' sentences, as ``--json`` lists them under ``errors``."""
        return [p.message for p in self.problems]

    @property
    def severity(self) -> Severity:
        """The worst finding severity: dangerous, suspicious or safe."""
        worst = max((Severity(f.severity).rank for f in self.findings), default=0)
        return {2: Severity.DANGEROUS, 1: Severity.SUSPICIOUS}.get(worst, Severity.SAFE)

    @property
    def verdict(self) -> Verdict:
        """dangerous > suspicious > not scanned > error > safe (dangerous wins over errors)."""
        sev = self.severity
        if sev is not Severity.SAFE:
            return Verdict(sev.value)
        if not self.scanned:
            return Verdict.NOT_SCANNED
        if self.problems:
            return Verdict.ERROR
        if self.skipped:
            return Verdict.SKIPPED
        return Verdict.SAFE

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain data (what a scan worker process sends back as JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileReport:
        problems = tuple(
            Problem(ProblemKind(p["kind"]), p["message"], p["member"]) for p in d["problems"]
        )
        findings = tuple(Finding(**f) for f in d["findings"])
        depends = tuple(
            (str(n), None if i is None else tuple(map(int, i))) for n, i in d.get("depends", ())
        )
        return cls(**{**d, "findings": findings, "problems": problems, "notes": tuple(d["notes"]),
                      "depends": depends})  # fmt: skip


@dataclass
class FileScan:
    """A FileReport being built while a file is scanned (``Ctx.report``); ``freeze`` gives it."""

    path: str
    format: Format = Format.UNKNOWN
    findings: list[Finding] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    scanned: bool = True
    streams: int = 0
    size: int = 0
    skipped: str | None = None
    self_contained: bool = True  # FileReport.self_contained
    depends: list[Dependency] = field(default_factory=list)  # FileReport.depends

    def problem(self, kind: ProblemKind, message: str, member: str | None = None) -> None:
        """Record a problem; ``member`` (a path inside the file) prefixes the sentence."""
        self.problems.append(Problem(kind, f"{member}: {message}" if member else message, member))

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)

    def freeze(self) -> FileReport:
        """The finished, frozen report."""
        return FileReport(
            self.path, self.format, tuple(self.findings), tuple(self.problems),
            tuple(self.notes), self.scanned, self.streams, self.size, skipped=self.skipped,
            self_contained=self.self_contained, depends=tuple(self.depends),
        )  # fmt: skip


def exit_code(verdicts: set[Verdict], errors: bool, *, strict: bool = False) -> ExitCode:
    """The exit code of a scan whose files had ``verdicts`` (and some ``errors``): 0 nothing
    dangerous, 1 dangerous (or suspicious with ``strict``), 2 something could not be scanned."""
    if Verdict.DANGEROUS in verdicts or (strict and Verdict.SUSPICIOUS in verdicts):
        return ExitCode.FINDINGS
    if errors or verdicts & {Verdict.ERROR, Verdict.NOT_SCANNED}:
        return ExitCode.ERROR
    return ExitCode.OK


class Scanned:
    """One file's outcome in a batch (``sdtool.scan.scan_items``): a fresh FileReport, or a
    verdict from the cache as its stored JSON ``body``, decoded only if ``report`` is asked
    for (a JSON Lines run copies the body out as it is)."""

    __slots__ = ("_body", "_report", "cached", "errors", "path", "sha256", "stored", "verdict")

    def __init__(
        self,
        path: str,
        report: FileReport | None = None,
        body: str | None = None,
        verdict: Verdict | None = None,
        sha256: str | None = None,
        cached: bool = False,
    ) -> None:
        self.path = path
        self._report = report
        self._body = body
        self.verdict: Verdict = report.verdict if report is not None else verdict or Verdict.ERROR
        self.sha256 = sha256
        self.cached = cached
        #: the stored body of a cached verdict (None for a fresh one: ``body`` encodes it)
        self.stored = body if cached else None
        #: what kept the file from being scanned completely (a complete cached verdict: none);
        #: plain attributes, as a rerun reads them for every file
        self.errors: Sequence[str] = report.errors if report is not None else ()

    @property
    def report(self) -> FileReport:
        """The FileReport (decoded from the body on first use), with ``cached`` and ``sha256``."""
        if self._report is None:
            from sdtool.scan.cached import report_from_body

            self._report = report_from_body(self._body or "{}", self.path)
        rep = self._report
        if (rep.cached, rep.sha256) != (self.cached, self.sha256):
            rep = self._report = replace(rep, cached=self.cached, sha256=self.sha256)
        return rep

    @property
    def body(self) -> str:
        """``FileReport.to_json``'s fields after the path, as JSON (``scan.cached.body_of``)."""
        if self._body is None:
            from sdtool.scan.cached import body_of

            self._body = body_of(self.report)
        return self._body


@dataclass(frozen=True)
class ScanReport(Result):
    """The files of one scan, in the order given, with the summary and exit code."""

    JSON_SCHEMA: ClassVar[str | None] = SCHEMA_VERSION
    JSON_KEYS: ClassVar[tuple[JsonKey, ...]] = (
        "tool", "strict", "exit_code", "summary", "files"
    )  # fmt: skip

    files: tuple[FileReport, ...] = ()
    strict: bool = False
    tool: ClassVar[str] = "sdtool scan"

    @property
    def summary(self) -> dict[str, int]:
        """Files per verdict, files, findings."""
        counts = {v.value: 0 for v in VERDICTS}
        for f in self.files:
            counts[f.verdict.value] += 1
        counts["files"] = len(self.files)
        counts["findings"] = sum(len(f.findings) for f in self.files)
        return counts

    @property
    def exit_code(self) -> ExitCode:
        """0 nothing dangerous, 1 dangerous (or suspicious with strict), 2 could not scan."""
        verdicts = {f.verdict for f in self.files}
        return exit_code(verdicts, any(f.problems for f in self.files), strict=self.strict)

    def to_json(self) -> dict[str, Any]:
        return utf8_safe(super().to_json())
