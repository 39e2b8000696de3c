"""The offline event log: Parquet files named by the Kafka offsets they hold.

Layout (under `Settings.log_dir`, a local path or any `pyarrow.fs` URI)::

    <topic>/date=<YYYY-MM-DD>/<topic>+<partition>+<first offset>+<last offset>.parquet

`date=` is the UTC day the file was written (ingestion date); the event time is the `ts`
column. A file holds the records of one partition from `first` to `last` offset inclusive
(bad records, which went to the DLQ, leave gaps). Files of one partition never overlap:
the writer skips offsets at or below `logged_upto(topic, partition)`, so a replayed
offset range is never written twice, and a file only appears whole (written under a
hidden temporary name, then renamed; object stores publish a PUT atomically).
Readers skip names that start with `.` or `_`. The files' schemas are the contract's
(`streaming.events.EVENT_LOG_SCHEMA` / `ITEM_LOG_SCHEMA`).
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from streaming.versioned_store import atomic_write

PARQUET_COMPRESSION = "zstd"
_NAME = re.compile(r"^(?P<topic>[A-Za-z0-9._-]+)\+(?P<partition>\d+)\+(?P<start>\d+)\+(?P<end>\d+)\.parquet$")


# A write that failed for want of room: the filesystem is full, a quota or the file size limit hit.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class LogDiskFull(OSError):
    """A log file could not be written for want of room. Nothing is lost: the file appears whole or not
    at all (the temporary file is removed) and offsets are committed only after the log is written, so
    a restarted `streamrec ingest` reads those records again."""

    def __init__(self, path: str, cause: OSError):
        super().__init__(cause.errno, f"cannot write the log file {path}: {cause.strerror} (the filesystem is full "
                                      f"or a size limit was hit). Nothing was committed for these records: free "
                                      f"space under {os.path.dirname(path)} and start `streamrec ingest` again; it "
                                      f"reads them again from Kafka")
        self.path = path

    def __str__(self) -> str:
        return self.strerror


@dataclass(frozen=True, order=True)
class LogFile:
    """One log file: `path` is relative to the filesystem returned by `OfflineLog.fs`."""

    topic: str
    partition: int
    start: int
    end: int
    path: str


def file_name(topic: str, partition: int, start: int, end: int) -> str:
    # Zero-padded so a lexical listing is in offset order.
    return f"{topic}+{partition:05d}+{start:020d}+{end:020d}.parquet"


def parse_name(name: str) -> tuple[str, int, int, int] | None:
    m = _NAME.match(name)
    if not m:
        return None
    return m["topic"], int(m["partition"]), int(m["start"]), int(m["end"])


def resolve_fs(root: str | Path) -> tuple[pafs.FileSystem, str]:
    """A `pyarrow.fs` filesystem and the path inside it for a local path or a URI."""
    root = str(root)
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), os.path.abspath(root)


class OfflineLog:
    """Writes and lists the offset-named Parquet files of the offline event log."""

    def __init__(self, root: str | Path):
        self.fs, self.root = resolve_fs(root)
        self._local = isinstance(self.fs, pafs.LocalFileSystem)

    def topic_dir(self, topic: str) -> str:
        return f"{self.root}/{topic}"

    def list_files(self, topic: str, partition: int | None = None) -> list[LogFile]:
        """Every complete log file of `topic` (optionally one partition), in (partition, offset) order."""
        selector = pafs.FileSelector(self.topic_dir(topic), recursive=True, allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            parsed = parse_name(info.base_name)
            if parsed is None or parsed[0] != topic:
                continue
            if partition is not None and parsed[1] != partition:
                continue
            out.append(LogFile(topic, parsed[1], parsed[2], parsed[3], info.path))
        return sorted(out)

    def logged_upto(self, topic: str, partition: int) -> int:
        """The last offset of `partition` held in the log, or -1 when none is."""
        files = self.list_files(topic, partition)
        return max((f.end for f in files), default=-1)

    def write(self, topic: str, partition: int, table: pa.Table, now: dt.datetime | None = None) -> LogFile:
        """Write one partition's records (already filtered to new offsets) as one file, atomically."""
        if table.num_rows == 0:
            raise ValueError("refusing to write an empty log file")
        offsets = table.column("offset")
        start = pc.min(offsets).as_py()
        end = pc.max(offsets).as_py()
        day = (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%d")
        directory = f"{self.topic_dir(topic)}/date={day}"
        final = f"{directory}/{file_name(topic, partition, start, end)}"
        try:
            self.fs.create_dir(directory, recursive=True)
            if self._local:
                atomic_write(final, lambda fh: pq.write_table(table, fh, compression=PARQUET_COMPRESSION))
            else:
                pq.write_table(table, final, filesystem=self.fs, compression=PARQUET_COMPRESSION)
        except OSError as exc:
            if exc.errno in NO_SPACE_ERRNOS:
                raise LogDiskFull(final, exc) from exc
            raise
        return LogFile(topic, partition, start, end, final)


class CorruptLogFile(RuntimeError):
    """A log file that is not readable Parquet of the contract's schema. Readers stop on it rather
    than return tables without its rows (never a silent wrong table); the message names the file,
    the offsets it held and the two ways out."""

    def __init__(self, log_root: str, file: LogFile, reason: str):
        self.file = file
        super().__init__(
            f"log file {file.path} is not readable Parquet ({reason}); it held offsets {file.start}..{file.end} of "
            f"{file.topic!r} partition {file.partition}. Stopped rather than build tables without those events. "
            f"Fix: restore the file from a backup and run the command again; or, to accept losing those events, "
            f"move it out of {log_root} (e.g. to <data dir>/quarantine/) and run it again")


def check_log_file(log: OfflineLog, file: LogFile, schema: pa.Schema, *, read_pages: bool = False) -> None:
    """Raise `CorruptLogFile` unless `file`'s footer parses, holds `schema`'s columns and at most one row
    per offset of its name's range; with `read_pages`, also decode every page (a full read)."""
    try:
        pf = pq.ParquetFile(file.path, filesystem=log.fs)
        have = pf.schema_arrow
        missing = [f.name for f in schema if have.get_field_index(f.name) < 0]
        if missing:
            raise CorruptLogFile(log.root, file, f"columns {missing} missing")
        rows = pf.metadata.num_rows
        # (0 rows is a file whose every row was erased by a forget request: streaming.forget)
        if not 0 <= rows <= file.end - file.start + 1:
            raise CorruptLogFile(log.root, file, f"{rows} rows for {file.end - file.start + 1} offsets")
        if read_pages:
            pf.read(columns=schema.names)
    except CorruptLogFile:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CorruptLogFile(log.root, file, f"{type(exc).__name__}: {exc}") from exc


def read_table(log: OfflineLog, files: list[LogFile], schema: pa.Schema) -> pa.Table:
    """Read some log files into one table (small data, tests and tools); `CorruptLogFile` names a bad one."""
    if not files:
        return schema.empty_table()
    return pa.concat_tables(_read_one(log, f, schema) for f in files)


def _read_one(log: OfflineLog, file: LogFile, schema: pa.Schema) -> pa.Table:
    try:
        return pq.read_table(file.path, filesystem=log.fs, schema=schema)
    except (pa.ArrowException, OSError) as exc:
        raise CorruptLogFile(log.root, file, f"{type(exc).__name__}: {exc}") from exc

