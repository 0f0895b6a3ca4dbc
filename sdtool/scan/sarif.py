"""SARIF 2.1.0 output for code-scanning UIs (GitHub code scanning and others).

One run, one tool (``sdtool scan``) whose rules are the rule ids findings carry; one result per
finding (errors become ``notifications`` of the invocation). Locations are the file path, with
the member path and byte offset in the message and ``properties`` (SARIF regions are text-based,
so byte offsets go in ``region.byteOffset``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtool import __version__
from sdtool.scan.report import ScanReport, utf8_safe

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"

#: rule id -> short description (rules not listed still appear, with their id as text)
RULE_TEXT: dict[str, str] = {
    "global": "A pickle imports a global that is not on the allowlist",
    "unresolved-global": "A pickle imports a global whose name is computed at load time",
    "computed-call": "A pickle calls an object that is not a plain import",
    "calls-arg": "An allowlisted callable given an argument it calls that is not allowlisted",
    "parser-disagreement": "The C unpickler and the opcode model read the pickle differently",
    "mutates-non-data": "BUILD/SETITEM/APPEND on an imported object or an opaque value",
    "persistent-id": "A persistent id that torch loaders do not produce",
    "frame-straddle": "An opcode crosses a protocol-4 FRAME boundary",
    "stream-broken": "A pickle stream breaks after its payload",
    "concatenated-pickle": "Several pickle streams in one file",
    "trailing-data": "Bytes after the last pickle stream",
    "polyglot": "The same bytes valid as a pickle and as another format",
    "torchscript": "A TorchScript archive (executable code)",
    "zip-crc": "A zip member whose CRC-32 does not match",
    "zip-name-mismatch": "A zip member named differently in its local header",
    "zip-duplicate": "Duplicate zip member names",
    "zip-flags": "Zip members with encryption/patch flag bits",
    "zip-prefix": "Bytes before the zip archive",
    "zip-irregular": "Another zip irregularity",
    "misnamed": "A file whose extension lies about its content",
    "safetensors-invalid": "A safetensors header that breaks the reference rules",
    "safetensors-lint": "A safetensors header that other parsers may read differently",
    "safetensors-metadata": "safetensors metadata that looks like code or a URL",
    "safetensors-hidden": "A pickle or zip hidden in a safetensors file",
    "rule-error": "A scanner rule crashed",
    "zip-ambiguous": "Zip readers disagree on the archive's members (all readings are scanned)",
    "tar-link": "A tar member that is a hard or symbolic link",
    "joblib-side-file": "A joblib pickle that makes joblib.load read a file beside it",
}
LEVEL = {"dangerous": "error", "suspicious": "warning", "info": "note"}


def to_sarif(report: ScanReport, base: Path | None = None) -> dict[str, Any]:
    """The report as a SARIF 2.1.0 log (a dict ready for json.dumps)."""
    used = sorted({f.rule for fr in report.files for f in fr.findings})
    rules = [
        {
            "id": rid,
            "shortDescription": {"text": RULE_TEXT.get(rid, rid)},
            "helpUri": "https://github.com/sdtool/sdtool/blob/main/docs/scan.md",
        }
        for rid in used
    ]
    index = {rid: i for i, rid in enumerate(used)}
    results: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []
    for fr in report.files:
        uri = _uri(fr.path, base)
        for f in fr.findings:
            where = f" [{f.member}]" if f.member else ""
            region: dict[str, Any] = {}
            if f.offset is not None and f.member is None:
                region = {"region": {"byteOffset": f.offset, "byteLength": 1}}
            results.append(
                {
                    "ruleId": f.rule,
                    "ruleIndex": index[f.rule],
                    "level": LEVEL.get(f.severity, "note"),
                    "message": {"text": f"{f.message}{where}"},
                    "locations": [
                        {"physicalLocation": {"artifactLocation": {"uri": uri}, **region}}
                    ],
                    "properties": {
                        "severity": f.severity,
                        "member": f.member,
                        "stream": f.stream,
                        "offset": f.offset,
                        "global": f.global_name,
                        "usage": f.usage,
                        "verdict": fr.verdict,
                    },
                }
            )
        for e in fr.errors:
            notes.append(
                {
                    "level": "error" if not fr.scanned else "warning",
                    "message": {"text": e},
                    "locations": [{"physicalLocation": {"artifactLocation": {"uri": uri}}}],
                }
            )
    return utf8_safe(
        {
            "$schema": SARIF_SCHEMA,
            "version": "2.1.0",
            "runs": [
                {
                    "tool": {
                        "driver": {
                            "name": "sdtool scan",
                            "version": __version__,
                            "informationUri": "https://github.com/sdtool/sdtool",
                            "rules": rules,
                        }
                    },
                    "invocations": [
                        {
                            "executionSuccessful": report.exit_code != 2,
                            "exitCode": report.exit_code,
                            "toolExecutionNotifications": notes,
                        }
                    ],
                    "results": results,
                }
            ],
        }
    )


def _uri(path: str, base: Path | None) -> str:
    p = Path(path)
    if base is not None:
        try:
            return p.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            pass
    return p.as_posix()
