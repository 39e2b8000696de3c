"""The trainer killed during publish, at each step of `Registry.publish`.

A child process publishes a version and dies at one step (`STREAMREC_FAULT_INJECT=registry.<step>`,
`os._exit` without cleanup: what a SIGKILL leaves) while reader threads do what serving's registry
follower and `streamrec registry` do: read the live pointer, list the versions, open the live one
with checksums verified. A read fails when it raises or sees a version whose files do not match
its manifest. After each crash: the previous version is still live (or, after the pointer swap, the
new one, complete), no half version is listed, and the next publish succeeds.

Not the whole `streamrec train` (minutes per run): the publish is the same `Registry.publish` the
trainer calls, in a process of its own. Requests = reader operations; events = publishes; lost = a
published version that is no longer listed or servable; recovery = crash -> the next version live."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.chaos_scenarios.common import ROOT, ScenarioResult, progress
from training.fault_injection import CRASH_EXIT_CODE, FAULT_ENV, REGISTRY_CRASH_STEPS, registry_point
from training.registry import MANIFEST, Registry, RegistryError

NAME = "trainer-sigkill-in-publish"
SCENE = "chaos"
PAYLOAD = "payload.bin"
PAYLOAD_BYTES = 256 * 1024  # big enough that copying and hashing a version takes a while
PUBLISH_TIMEOUT_S = 120.0
READ_PAUSE_S = 0.002  # between two reads of one reader thread: the publish must get the CPU too

_CRASHING_PUBLISH = """
import json, pathlib, sys
from training.registry import Registry
Registry(sys.argv[1]).publish(sys.argv[2], pathlib.Path(sys.argv[3]), json.loads(sys.argv[4]))
"""


def payload(tag: str) -> bytes:
    unit = (tag * 64).encode()
    return (unit * (PAYLOAD_BYTES // len(unit) + 1))[:PAYLOAD_BYTES]


def stage(workdir: Path, tag: str) -> Path:
    directory = workdir / f"staged-{tag}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / PAYLOAD).write_bytes(payload(tag))
    return directory


class Readers:
    """Threads reading the registry as serving does, counting reads and bad reads."""

    def __init__(self, root: Path, threads: int = 2):
        self.root, self.reads, self.bad = root, 0, []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def __enter__(self) -> "Readers":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _loop(self) -> None:
        reg = Registry(str(self.root))
        while not self._stop.is_set():
            problem = None
            try:
                listed = [v.version for v in reg.versions(SCENE)]
                if len(listed) != len(set(listed)):
                    problem = f"a version listed twice: {listed}"
                for version in listed:
                    reg.verify(SCENE, version)  # a listed version is whole
                directory = reg.open(SCENE, verify=True)
                tag = json.loads((directory / MANIFEST).read_text())["tag"]
                if (directory / PAYLOAD).read_bytes() != payload(tag):
                    problem = f"{directory} serves files that are not version {tag}'s"
            except (RegistryError, OSError, ValueError, KeyError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.reads += 1
                if problem:
                    self.bad.append(problem)
            time.sleep(READ_PAUSE_S)


def _crash_publish(root: Path, staged: Path, tag: str, step: str) -> int:
    env = {**os.environ, FAULT_ENV: registry_point(step), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _CRASHING_PUBLISH, str(root), SCENE, str(staged),
                           json.dumps({"tag": tag})], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=PUBLISH_TIMEOUT_S)
    return proc.returncode


def run(kafka_bootstrap: str | None, redis_url: str | None, workdir: Path, *, rounds: int = 3) -> ScenarioResult:
    del kafka_bootstrap, redis_url  # the registry is files: no stack needed
    result = ScenarioResult(NAME)
    root = workdir / "registry"
    reg = Registry(str(root))
    reg.publish(SCENE, stage(workdir, "t0"), {"tag": "t0"})
    published = ["v000001"]
    result.events = 1
    recoveries = []
    with Readers(root) as readers:
        for r in range(rounds):
            for step in REGISTRY_CRASH_STEPS:
                tag = f"t{result.events}"
                live_before = reg.current(SCENE).version
                rc = _crash_publish(root, stage(workdir, tag), tag, step)
                crashed_at = time.monotonic()
                result.events += 1
                result.check(rc == CRASH_EXIT_CODE, f"the publish to crash at {step} exited {rc}")
                live = reg.current(SCENE).version
                if step == "after_pointer_replace":  # the swap happened: the new version is whole and live
                    result.check(live != live_before, f"after a crash {step}, the new version is not live")
                    published.append(live)
                else:
                    result.check(live == live_before, f"a crash {step} changed the live version to {live}")
                listed = [v.version for v in reg.versions(SCENE)]
                result.check(listed == published, f"after a crash {step}: listed {listed}, published {published}")
                # The next run publishes normally on top of what is live.
                nxt = reg.publish(SCENE, stage(workdir, f"{tag}n"), {"tag": f"{tag}n"}, expected_parent=live)
                recoveries.append(time.monotonic() - crashed_at)
                result.events += 1
                published.append(nxt.version)
                result.check(reg.current(SCENE).version == nxt.version, f"the publish after a crash {step} is not live")
                progress(f"{NAME}: crash {step} -> live {live} (was {live_before}), next publish {nxt.version}")
    result.requests, result.failed = readers.reads, len(readers.bad)
    result.check(not readers.bad, f"{len(readers.bad)} bad reads, first: {readers.bad[:1]}")
    listed = [v.version for v in reg.versions(SCENE)]
    result.lost = len(set(published) - set(listed))
    result.duplicated = len(listed) - len(set(listed))
    result.check(result.lost == 0 and result.duplicated == 0, f"published {published}, listed {listed}")
    result.recovery_s = max(recoveries, default=0.0)
    result.notes.append(f"steps {', '.join(REGISTRY_CRASH_STEPS)} x {rounds}; {readers.reads} reads during crashes")
    return result
