"""A result cache that hub-scale batches can share: file identity -> SHA-256 -> results.

Two tables, because the two facts age differently:

* ``files``: (device, inode, size, mtime_ns, ctime_ns) -> SHA-256 of the content. A file whose
  identity changed in any of these is a new file: its hash is never trusted. ctime is in the
  key because a writer can reset mtime (``touch -d``) but not ctime.
* ``results``: (SHA-256, kind, version) -> a JSON document (a scan verdict, an identity, the
  hashes). ``version`` names what produced the result (the scan ruleset, sdtool's version), so
  a new ruleset invalidates verdicts and nothing else.

SQLite in WAL mode (stdlib, no service, safe with several processes: readers never block the
writer, writers wait for each other up to ``timeout``). Every failure to use the cache (a
read-only or corrupt database, a full disk) degrades to "no cache" rather than failing the job:
the cache is an accelerator, never a source of truth.

Hygiene (``Cache.prune``; ``sdtool cache prune``): results of other producer versions than the
newest KEEP_VERSIONS of a kind are dropped, and so are the rows of files that are gone or have
changed (``seen`` remembers where each identity was met). Writing a new identity drops the
rows of that inode's older identities at once; the rest runs when a process first writes
and the last prune is older than PRUNE_EVERY, bounded to PRUNE_STATS stats of remembered
files per run (a rotating cursor), so no run pays for the whole table.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

SCHEMA = 1
#: reads share one read transaction for up to this many lookups or seconds (see ``_reading``)
READ_BATCH = 512
READ_SECONDS = 0.25
#: identities per query of ``lookup_many`` (6 bound values each, well under SQLite's limit)
LOOKUP_CHUNK = 256
#: per kind, the producer versions whose results are kept (the newest by last write);
#: a version is the text before the first "|" (scan: the ruleset, not its option suffix)
KEEP_VERSIONS = 3
VERSIONED_KINDS = ("scan", "hash", "inspect")
#: seconds between automatic prunes, and remembered files stat'ed per prune (0: all)
PRUNE_EVERY = 6 * 3600.0
PRUNE_STATS = 2000
_DDL = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS versions (kind TEXT, version TEXT, used REAL NOT NULL,"
    " PRIMARY KEY (kind, version))",
    "CREATE TABLE IF NOT EXISTS seen (dev INTEGER, ino INTEGER, path TEXT NOT NULL,"
    " PRIMARY KEY (dev, ino))",
    "CREATE TABLE IF NOT EXISTS files ("
    " dev INTEGER, ino INTEGER, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER,"
    " sha256 TEXT NOT NULL, PRIMARY KEY (dev, ino, size, mtime_ns, ctime_ns))",
    "CREATE TABLE IF NOT EXISTS results ("
    " sha256 TEXT, kind TEXT, version TEXT, value TEXT NOT NULL,"
    " PRIMARY KEY (sha256, kind, version))",
    "CREATE INDEX IF NOT EXISTS files_sha256 ON files (sha256)",
)


def default_dir() -> Path:
    """``$SDTOOL_CACHE_DIR``, else ``$XDG_CACHE_HOME/sdtool``, else ``~/.cache/sdtool``."""
    env = os.environ.get("SDTOOL_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sdtool"


class Identity(NamedTuple):
    """What says "this is still the same file": any change means the content may differ."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @classmethod
    def of_path(cls, path: str | Path) -> Identity:
        return cls.of(os.stat(path))

    @property
    def key(self) -> str:
        """A results-table key for "this very file, unchanged" (when no SHA-256 is known)."""
        return f"id:{self.dev}:{self.ino}:{self.size}:{self.mtime_ns}:{self.ctime_ns}"


#: one query answers a chunk of identities: each one's SHA-256 (files) and the result stored
#: under its identity key (``Identity.key``, spelled in SQL), else under that SHA-256
#: (results); every join is a primary-key probe. The rows are the first parameters, kind and
#: version the last two (``{k}``, ``{v}``: their numbers), so that every full chunk has the
#: same text (one prepared statement), and the rows are read as they come, not copied into a
#: temporary table first (NOT MATERIALIZED): ~9% fewer instructions per identity.
_LOOKUP_SQL = (
    "WITH q(i, dev, ino, size, mtime_ns, ctime_ns) AS NOT MATERIALIZED (VALUES {rows})"
    " SELECT q.i, f.sha256, coalesce(r1.value, r2.value) FROM q"
    " LEFT JOIN files f ON f.dev = q.dev AND f.ino = q.ino AND f.size = q.size"
    " AND f.mtime_ns = q.mtime_ns AND f.ctime_ns = q.ctime_ns"
    " LEFT JOIN results r1 ON r1.sha256 = 'id:' || q.dev || ':' || q.ino || ':' || q.size"
    " || ':' || q.mtime_ns || ':' || q.ctime_ns AND r1.kind = ?{k} AND r1.version = ?{v}"
    " LEFT JOIN results r2 ON r1.value IS NULL AND r2.sha256 = f.sha256"
    " AND r2.kind = ?{k} AND r2.version = ?{v}"
)


def _lookup_sql(n: int) -> str:
    """The lookup query for ``n`` identities (module comment above)."""
    rows = ",".join(["(?,?,?,?,?,?)"] * n)
    return _LOOKUP_SQL.format(rows=rows, k=6 * n + 1, v=6 * n + 2)


def open_cache(directory: str | Path | None = None, *, enabled: bool = True) -> Cache | None:
    """The cache in ``directory`` (default: ``default_dir()``), or None when disabled."""
    return Cache(directory) if enabled else None


class Cache:
    """The cache in ``directory`` (created on first use). Thread- and process-safe.

    Example:
        >>> cache = Cache(tmp)
        >>> sha = cache.sha256(path)                 # None: not known for this identity
        >>> cache.put_sha256(ident, digest)          # after hashing, if identity unchanged
        >>> cache.put("scan", digest, ruleset, report.to_json())
    """

    def __init__(self, directory: str | Path | None = None, *, timeout: float = 30.0) -> None:
        self.directory = Path(directory) if directory is not None else default_dir()
        self.path = self.directory / "cache.sqlite3"
        self._timeout = timeout
        self._local = threading.local()
        self.disabled_reason: str | None = None
        self._noted: set[tuple[str, str]] = set()  # (kind, version) whose last write is noted
        self._auto_prune = True  # until this process's first write has checked the clock

    # -- connection -----------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection | None:
        if self.disabled_reason is not None:
            return None
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        try:
            if not self.directory.is_dir():
                self.directory.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            for stmt in _DDL:
                conn.execute(stmt)
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA),))
            elif row[0] != str(SCHEMA):
                conn.close()
                self.disabled_reason = f"{self.path}: cache schema {row[0]}, expected {SCHEMA}"
                return None
        except (OSError, sqlite3.Error) as e:
            self.disabled_reason = f"{self.path}: cache unusable ({e}); continuing without it"
            return None
        self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _use(self) -> Iterator[sqlite3.Connection | None]:
        conn = self._conn()
        try:
            yield conn
        except sqlite3.Error as e:  # locked past timeout, corrupt, disk full: no cache
            self.disabled_reason = f"{self.path}: cache unusable ({e}); continuing without it"

    def _reading(self, conn: sqlite3.Connection) -> None:
        """Start or continue a read transaction shared by consecutive lookups.

        Each statement in its own transaction takes and releases SQLite's WAL read lock and
        revalidates its page cache: at 10,000 files that dominated a cached rerun. Lookups
        therefore share one read transaction, for at most READ_BATCH lookups or READ_SECONDS
        (a snapshot at most that old: another process's fresh rows are seen a moment later,
        never a wrong row), and any write ends it first.
        """
        st = self._local
        now = time.monotonic()
        if conn.in_transaction:
            st.reads += 1
            if st.reads < READ_BATCH and now - st.since < READ_SECONDS:
                return
            conn.execute("COMMIT")
        conn.execute("BEGIN")
        st.reads, st.since = 0, now

    def _writing(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:  # a shared read transaction: end it, then write on our own
            conn.execute("COMMIT")

    def release(self) -> None:
        """End this thread's shared read transaction (after a run of lookups, before slow
        work), so it does not hold back other processes' WAL checkpoints meanwhile."""
        with self._use() as conn:
            if conn is not None:
                self._writing(conn)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._writing(conn)
            conn.close()
            self._local.conn = None

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- file identity -> sha256 -----------------------------------------------------------
    def sha256(self, ident: Identity) -> str | None:
        """The SHA-256 recorded for exactly this identity, or None."""
        with self._use() as conn:
            if conn is None:
                return None
            self._reading(conn)
            row = conn.execute(
                "SELECT sha256 FROM files WHERE dev=? AND ino=? AND size=? AND mtime_ns=?"
                " AND ctime_ns=?",
                (ident.dev, ident.ino, ident.size, ident.mtime_ns, ident.ctime_ns),
            ).fetchone()
            return None if row is None else str(row[0])
        return None

    def put_sha256(self, ident: Identity, sha256: str, path: str | Path | None = None) -> None:
        """Record ``sha256`` for ``ident`` (the caller checked the identity held while hashing)
        and, with ``path``, where that file is (to prune its rows once it is gone). The rows
        of the inode's older identities (the file changed since) are dropped."""
        with self._use() as conn:
            if conn is not None:
                self._writing(conn)
                with _tx(conn):
                    self._drop_files(conn, ident.dev, ident.ino, ident[2:])
                    conn.execute(
                        "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                        (ident.dev, ident.ino, ident.size, ident.mtime_ns, ident.ctime_ns, sha256),
                    )
                    self._seen(conn, ident.dev, ident.ino, path)
                self._after_write(conn)

    def lookup_many(
        self, kind: str, version: str, idents: Sequence[Identity]
    ) -> list[tuple[str | None, str | None]]:
        """For each identity, (its recorded SHA-256, the stored text of result ``kind`` by
        ``version``), either None when unknown: in one query per LOOKUP_CHUNK identities.

        The result is looked up under the identity's key first (this very file, unchanged),
        then under its recorded SHA-256 (the same content anywhere). The text is returned as
        stored, undecoded: a caller that only copies it out never parses it.
        """
        return self._lookup(kind, version, idents, len(idents))

    def lookup_stats(
        self, kind: str, version: str, stats: Sequence[os.stat_result]
    ) -> list[tuple[str | None, str | None]]:
        """``lookup_many`` of the files these stats describe (``Identity.of`` each), without
        building an Identity per file: a rerun over an unchanged tree looks up every file."""
        rows = ((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for s in stats)
        return self._lookup(kind, version, rows, len(stats))

    def _lookup(
        self, kind: str, version: str, idents: Iterable[Sequence[int]], n: int
    ) -> list[tuple[str | None, str | None]]:
        out: list[tuple[str | None, str | None]] = [(None, None)] * n
        with self._use() as conn:
            if conn is None:
                return out
            it = iter(idents)
            full = _lookup_sql(LOOKUP_CHUNK)
            for lo in range(0, n, LOOKUP_CHUNK):
                m = min(LOOKUP_CHUNK, n - lo)
                self._reading(conn)
                params: list[object] = []
                for j in range(lo, lo + m):
                    params.append(j)
                    params += next(it)
                params += (kind, version)
                sql = full if m == LOOKUP_CHUNK else _lookup_sql(m)
                for j, sha, value in conn.execute(sql, params):
                    out[j] = (sha, value)
        return out

    # -- (sha256, kind, version) -> result ---------------------------------------------------
    def get(self, kind: str, sha256: str, version: str) -> dict[str, Any] | None:
        """The result ``kind`` stored for this content and producer version, or None."""
        text = self.get_text(kind, sha256, version)
        if text is None:
            return None
        try:
            value = json.loads(text)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def get_text(self, kind: str, sha256: str, version: str) -> str | None:
        """As ``get``, the stored text undecoded."""
        with self._use() as conn:
            if conn is None:
                return None
            self._reading(conn)
            row = conn.execute(
                "SELECT value FROM results WHERE sha256=? AND kind=? AND version=?",
                (sha256, kind, version),
            ).fetchone()
            return None if row is None else str(row[0])
        return None

    def put(
        self,
        kind: str,
        sha256: str,
        version: str,
        value: dict[str, Any],
        path: str | Path | None = None,
    ) -> None:
        """Store a JSON-able result for this content and producer version."""
        text = json.dumps(value, sort_keys=True, ensure_ascii=True)
        self.put_text(kind, sha256, version, text, path)

    def put_text(
        self, kind: str, sha256: str, version: str, text: str, path: str | Path | None = None
    ) -> None:
        """Store an encoded result (JSON text) as it is, to be copied out as it is.

        ``sha256`` is a content hash or an identity's key (``Identity.key``); for the latter,
        ``path`` says where the file is (to prune its rows once it is gone), and the results
        of this kind under the inode's older identities are dropped."""
        with self._use() as conn:
            if conn is not None:
                self._writing(conn)
                with _tx(conn):
                    conn.execute(
                        "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?)",
                        (sha256, kind, version, text),
                    )
                    if sha256.startswith("id:"):
                        dev, ino = (int(x) for x in sha256.split(":")[1:3])
                        lo, hi = _id_range(dev, ino)
                        conn.execute(
                            "DELETE FROM results WHERE sha256 >= ? AND sha256 < ? AND kind=?"
                            " AND sha256 != ?",
                            (lo, hi, kind, sha256),
                        )
                        self._seen(conn, dev, ino, path)
                    self._note_version(conn, kind, version)
                self._after_write(conn)

    # -- hygiene ----------------------------------------------------------------------------
    def _seen(self, conn: sqlite3.Connection, dev: int, ino: int, path: str | Path | None) -> None:
        if path is not None:  # as bytes: a name need not be UTF-8
            where = os.fsencode(os.path.abspath(path))
            conn.execute("INSERT OR REPLACE INTO seen VALUES (?, ?, ?)", (dev, ino, where))

    def _drop_files(
        self, conn: sqlite3.Connection, dev: int, ino: int, keep: Sequence[int]
    ) -> tuple[int, int]:
        """Drop the ``files`` rows of inode (dev, ino) but the identity with ``keep`` (size,
        mtime_ns, ctime_ns), and the results under their SHA-256s that no other file has;
        returns the rows dropped (files, results)."""
        where = "dev=? AND ino=? AND NOT (size=? AND mtime_ns=? AND ctime_ns=?)"
        args = (dev, ino, *keep)
        shas = [r[0] for r in conn.execute(f"SELECT sha256 FROM files WHERE {where}", args)]
        if not shas:
            return 0, 0
        files = conn.execute(f"DELETE FROM files WHERE {where}", args).rowcount
        results = 0
        for sha in set(shas):
            if conn.execute("SELECT 1 FROM files WHERE sha256=? LIMIT 1", (sha,)).fetchone():
                continue  # a copy elsewhere still has this content
            results += conn.execute("DELETE FROM results WHERE sha256=?", (sha,)).rowcount
        return files, results

    def _note_version(self, conn: sqlite3.Connection, kind: str, version: str) -> None:
        name = version.split("|", 1)[0]
        if (kind, name) not in self._noted:
            self._noted.add((kind, name))
            conn.execute(
                "INSERT OR REPLACE INTO versions VALUES (?, ?, ?)", (kind, name, time.time())
            )

    def _after_write(self, conn: sqlite3.Connection) -> None:
        """A process's first write prunes, when the last prune is older than PRUNE_EVERY."""
        if not self._auto_prune:
            return
        self._auto_prune = False
        row = conn.execute("SELECT value FROM meta WHERE key='pruned_at'").fetchone()
        if row is None or time.time() - float(row[0]) > PRUNE_EVERY:
            self.prune(stats=PRUNE_STATS)

    def prune(self, *, stats: int = 0, keep: int = KEEP_VERSIONS) -> dict[str, int]:
        """Drop what can no longer be used; returns the rows dropped per table.

        * results of kinds VERSIONED_KINDS whose producer version is not among the ``keep``
          newest written (by last write);
        * the rows of remembered files (``seen``) that are gone, or whose identity changed:
          ``stats`` of them are checked (0: all), from where the last prune stopped;
        * results stored under the SHA-256 of such a file's content, when no other recorded
          file has that content.

        Safe while other processes use the cache: each step is one short write transaction,
        and a row dropped under another process's feet only costs it a fresh scan or hash.
        """
        dropped = {"results": 0, "files": 0, "seen": 0}
        conn = self._conn()
        if conn is None:
            return dropped
        try:
            self._writing(conn)
            with _tx(conn):
                for kind in VERSIONED_KINDS:
                    cur = conn.execute(
                        "DELETE FROM results WHERE kind=?1 AND substr(version, 1,"
                        " instr(version || '|', '|') - 1) NOT IN (SELECT version FROM versions"
                        " WHERE kind=?1 ORDER BY used DESC LIMIT ?2)",
                        (kind, keep),
                    )
                    dropped["results"] += cur.rowcount
                    conn.execute(
                        "DELETE FROM versions WHERE kind=?1 AND version NOT IN (SELECT version"
                        " FROM versions WHERE kind=?1 ORDER BY used DESC LIMIT ?2)",
                        (kind, keep),
                    )
            self._prune_seen(conn, stats, dropped)
            with _tx(conn):
                conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('pruned_at', ?)", (repr(time.time()),)
                )
        except sqlite3.Error as e:
            self.disabled_reason = f"{self.path}: cache unusable ({e}); continuing without it"
        return dropped

    def _prune_seen(self, conn: sqlite3.Connection, stats: int, dropped: dict[str, int]) -> None:
        """Check ``stats`` remembered files (0: all) from the cursor; drop the rows of those
        gone (another inode, or none, at the path) or changed (other identities' rows)."""
        row = conn.execute("SELECT value FROM meta WHERE key='prune_cursor'").fetchone()
        after = tuple(int(x) for x in row[0].split(":")) if row and stats else (-1, -1)
        rows = conn.execute(
            "SELECT dev, ino, path FROM seen WHERE (dev, ino) > (?, ?) ORDER BY dev, ino"
            + (" LIMIT ?" if stats else ""),
            (*after, stats) if stats else after,
        ).fetchall()
        if stats and len(rows) < stats and after != (-1, -1):  # wrap around to the start
            rows += conn.execute(
                "SELECT dev, ino, path FROM seen WHERE (dev, ino) <= (?, ?) ORDER BY dev, ino"
                " LIMIT ?",
                (*after, stats - len(rows)),
            ).fetchall()
        for dev, ino, path in rows:
            try:
                st = os.stat(path)
                now: Identity | None = Identity.of(st)
            except OSError:
                now = None
            if now is not None and (now.dev, now.ino) != (dev, ino):
                now = None  # another file at that path now
            lo, hi = _id_range(dev, ino)
            with _tx(conn):
                keep = (now.size, now.mtime_ns, now.ctime_ns) if now else (-1, -1, -1)
                files, results = self._drop_files(conn, dev, ino, keep)
                dropped["files"] += files
                dropped["results"] += (
                    results
                    + conn.execute(
                        "DELETE FROM results WHERE sha256 >= ? AND sha256 < ? AND sha256 != ?",
                        (lo, hi, now.key if now else ""),
                    ).rowcount
                )
                if now is None:
                    dropped["seen"] += conn.execute(
                        "DELETE FROM seen WHERE dev=? AND ino=?", (dev, ino)
                    ).rowcount
        if rows:
            last = f"{rows[-1][0]}:{rows[-1][1]}"
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('prune_cursor', ?)", (last,))

    def info(self) -> dict[str, Any]:
        """What the cache holds: its path and size, rows per table and kind, versions."""
        out: dict[str, Any] = {"path": str(self.path), "bytes": 0}
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                out["bytes"] += os.path.getsize(f"{self.path}{suffix}")
        with self._use() as conn:
            if conn is None:
                out["disabled"] = self.disabled_reason
                return out
            self._writing(conn)
            out["rows"] = {
                t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
                for t in ("files", "results", "seen")
            }
            out["results"] = dict(
                conn.execute("SELECT kind, count(*) FROM results GROUP BY kind").fetchall()
            )
            out["versions"] = [
                {"kind": k, "version": v, "last_write": u}
                for k, v, u in conn.execute(
                    "SELECT kind, version, used FROM versions ORDER BY kind, used DESC"
                )
            ]
            row = conn.execute("SELECT value FROM meta WHERE key='pruned_at'").fetchone()
            out["pruned_at"] = float(row[0]) if row else None
        return out

    def stats(self) -> dict[str, int]:
        """Row counts, for ``--debug`` and tests."""
        with self._use() as conn:
            if conn is None:
                return {"files": 0, "results": 0}
            self._writing(conn)  # counts as of now, not of a shared read snapshot
            return {
                t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
                for t in ("files", "results")
            }
        return {"files": 0, "results": 0}


@contextlib.contextmanager
def _tx(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (the connection is in autocommit mode): all or nothing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _id_range(dev: int, ino: int) -> tuple[str, str]:
    """The range of ``Identity.key`` texts of one inode: [``id:D:I:``, ``id:D:I;``)."""
    return f"id:{dev}:{ino}:", f"id:{dev}:{ino};"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the whole file, read in large chunks (hashlib releases the GIL)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def cached_sha256(cache: Cache | None, path: str | Path, compute: Any) -> tuple[str, bool]:
    """SHA-256 of ``path`` from the cache, or ``compute()`` (hex) recorded when safe.

    Returns (hex digest, whether it came from the cache). The result is recorded only when the
    file's identity was the same before and after ``compute`` ran: a file that changed while it
    was read is hashed again next time.
    """
    before = Identity.of_path(path)
    if cache is not None:
        known = cache.sha256(before)
        if known is not None:
            return known, True
    digest = str(compute())
    if cache is not None and Identity.of_path(path) == before:
        cache.put_sha256(before, digest, path)
    return digest, False
