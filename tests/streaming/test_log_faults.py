"""The offline log's faults, named: a corrupt or torn file (`CorruptLogFile`) and a write that finds no
room (`LogDiskFull`); the chaos suite (tests/test_chaos.py) drives both through the real commands."""

from __future__ import annotations

import os
import resource
import signal

import pyarrow as pa
import pytest

from streaming.events import EVENT_LOG_SCHEMA
from streaming.offline_log import CorruptLogFile, LogDiskFull, OfflineLog, check_log_file, read_table

TOPIC = "events"


def rows(n: int, first: int = 0) -> pa.Table:
    return pa.Table.from_pylist([{"event_id": f"e{i}", "user_id": f"u{i % 3}", "item_id": f"i{i % 5}", "type": "click",
                                  "ts": 1_000 + i, "partition": 0, "offset": first + i, "ingest_ts": 0}
                                 for i in range(n)], schema=EVENT_LOG_SCHEMA)


def test_a_torn_file_is_named_with_its_offsets_by_the_check_and_by_readers(tmp_path):
    log = OfflineLog(tmp_path / "log")
    good = log.write(TOPIC, 0, rows(50))
    torn = log.write(TOPIC, 0, rows(50, first=50))
    data = open(torn.path, "rb").read()
    with open(torn.path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    check_log_file(log, good, EVENT_LOG_SCHEMA, read_pages=True)
    with pytest.raises(CorruptLogFile) as info:
        check_log_file(log, torn, EVENT_LOG_SCHEMA)
    msg = str(info.value)
    assert torn.path in msg and "offsets 50..99" in msg and "restore" in msg and info.value.file == torn
    with pytest.raises(CorruptLogFile, match="offsets 50..99"):
        read_table(log, log.list_files(TOPIC), EVENT_LOG_SCHEMA)


def test_a_file_with_more_rows_than_offsets_or_missing_columns_is_refused(tmp_path):
    log = OfflineLog(tmp_path / "log")
    f = log.write(TOPIC, 0, rows(10))
    bigger = log.write(TOPIC, 1, rows(10, first=100))
    os.replace(bigger.path, f.path.replace("+00000000000000000009.parquet", "+00000000000000000004.parquet"))
    short = [x for x in log.list_files(TOPIC) if x.end == 4][0]
    with pytest.raises(CorruptLogFile, match="10 rows for 5 offsets"):
        check_log_file(log, short, EVENT_LOG_SCHEMA)
    with pytest.raises(CorruptLogFile, match="columns"):
        check_log_file(log, f, EVENT_LOG_SCHEMA.append(pa.field("extra", pa.int64())))


def test_no_room_for_a_log_file_is_one_clear_error_and_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE in a forked child stands in for a full filesystem (EFBIG like ENOSPC)."""
    log = OfflineLog(tmp_path / "log")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a file size limit below one log file, then the write
        os.close(read_end)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
        try:
            log.write(TOPIC, 0, rows(2000))
            msg = "written"
        except LogDiskFull as exc:
            msg = f"LogDiskFull {exc.path}\n{exc}"
        except BaseException as exc:
            msg = f"{type(exc).__name__}: {exc}"
        os.write(write_end, msg.encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as fh:
        got = fh.read()
    assert got.startswith("LogDiskFull "), got
    path = got.split("\n")[0].split(" ", 1)[1]
    assert f"cannot write the log file {path}" in got and "streamrec ingest" in got
    assert not [p for p in (tmp_path / "log").rglob("*") if p.is_file()]  # no partial or temporary file
