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
        self.fs.create_dir(directory, recursive=True)
        if self._local:
            atomic_write(final, lambda fh: pq.write_table(table, fh, compression=PARQUET_COMPRESSION))
        else:
            pq.write_table(table, final, filesystem=self.fs, compression=PARQUET_COMPRESSION)
        return LogFile(topic, partition, start, end, final)


def read_table(log: OfflineLog, files: list[LogFile], schema: pa.Schema) -> pa.Table:
    """Read some log files into one table (small data, tests and tools)."""
    if not files:
        return schema.empty_table()
    return pa.concat_tables(pq.read_table(f.path, filesystem=log.fs, schema=schema) for f in files)

