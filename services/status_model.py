"""What `streamrec status` observes and concludes: plain data, no I/O.

`services/status_sources.py` fills a `Snapshot` from the running parts; `services/status.py` turns
it into `Check`s (the verdict logic, pure, so unit tests hand it fake snapshots);
`services/status_view.py` renders the checks and the snapshot for a terminal or as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

OK, WARN, FAIL = "ok", "warn", "fail"
STATUSES = (OK, WARN, FAIL)  # in order of severity

# The parts `--require` can name (see services/status.py for what "missing" means for each).
BROKER, REDIS, INGEST, FEATURES, REGISTRY, API = "broker", "redis", "ingest", "features", "registry", "api"
PARTS = (BROKER, REDIS, INGEST, FEATURES, REGISTRY, API)

Labels = dict[str, str]


@dataclass(frozen=True)
class Samples:
    """The samples of one Prometheus text exposition: (sample name, labels, value).

    Sample names are as exposed: a counter's samples end in `_total`, a histogram's in
    `_bucket` / `_sum` / `_count`."""

    samples: tuple[tuple[str, Labels, float], ...] = ()

    def select(self, name: str, **labels: str) -> list[tuple[Labels, float]]:
        """The samples called `name` whose labels include `labels`."""
        return [(lab, v) for n, lab, v in self.samples
                if n == name and all(lab.get(k) == want for k, want in labels.items())]

    def value(self, name: str, **labels: str) -> float | None:
        """The sum of the matching samples, or None when there is none."""
        found = self.select(name, **labels)
        return sum(v for _, v in found) if found else None

    def has(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.samples)

    @classmethod
    def of(cls, rows: Iterable[tuple[str, Labels, float]]) -> "Samples":
        return cls(tuple((n, dict(lab), float(v)) for n, lab, v in rows))


@dataclass(frozen=True)
class Endpoint:
    """The broker or Redis: where it is, who said so, and whether it answered."""

    address: str | None
    origin: str  # "embedded" (the stack's state file) or "configured" (settings)
    reachable: bool
    detail: str = ""  # the pid / cluster id when it answers, the error when not


@dataclass(frozen=True)
class Scrape:
    """One GET /metrics: the parsed samples, or why there are none."""

    url: str
    metrics: Samples | None = None
    error: str | None = None


@dataclass(frozen=True)
class FeaturesObs:
    """The feature store's live manifest and the feature job's outcome file (`features.prom`)."""

    manifest_version: int | None = None
    manifest_created_at: float | None = None  # Unix seconds
    prom: Samples | None = None  # None: no features.prom (the feature job never ran under this data dir)
    prom_path: str = ""
    error: str | None = None  # unreadable manifest or metrics file


@dataclass(frozen=True)
class SceneObs:
    """One scene of the registry: its live version and the trainer's outcome file for it."""

    scene: str
    live_version: str | None
    created_at: float | None = None  # Unix seconds, of the live version
    val_ndcg10: float | None = None
    train: Samples | None = None  # train-<scene>.prom, when the trainer wrote one


@dataclass(frozen=True)
class RegistryObs:
    root: str
    scenes: tuple[SceneObs, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class ApiObs:
    """The HTTP API: readiness, the versions every replica serves (GET /v1/models), its metrics."""

    url: str
    reachable: bool = False
    ready: bool | None = None
    scene_states: dict[str, dict] = field(default_factory=dict)  # GET /readyz `scenes`
    models: dict | None = None  # GET /v1/models body (services/api_schema.py ModelsResponse)
    metrics: Samples | None = None
    error: str | None = None  # why it is unreachable, or what part of it did not answer


@dataclass(frozen=True)
class Snapshot:
    """Everything one `streamrec status` saw, at `now` (Unix seconds)."""

    now: float
    stack: str  # "embedded", "configured" or "mixed" (one of each)
    data_dir: str
    broker: Endpoint
    redis: Endpoint
    ingest: tuple[Scrape, ...]
    features: FeaturesObs
    registry: RegistryObs
    api: ApiObs


@dataclass(frozen=True)
class Check:
    """One verdict: `name` (the part, or part.aspect), ok / warn / fail, what was seen, and why
    it is not ok (empty when it is)."""

    name: str
    status: str
    summary: str
    reason: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check {self.name!r}: status must be one of {STATUSES}, got {self.status!r}")


def fmt_age(seconds: float | None) -> str:
    """A duration for people: 42 s, 7 min, 3.5 h, 2.0 d ("?" when unknown)."""
    if seconds is None:
        return "?"
    s = max(0.0, float(seconds))
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172_800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86_400:.1f} d"


def worst(statuses: Iterable[str]) -> str:
    """The most severe of `statuses` (OK for none)."""
    return max(statuses, key=STATUSES.index, default=OK)


__all__ = ["API", "BROKER", "FAIL", "FEATURES", "INGEST", "OK", "PARTS", "REDIS", "REGISTRY", "STATUSES", "WARN",
           "ApiObs", "Check", "Endpoint", "FeaturesObs", "Labels", "RegistryObs", "Samples", "SceneObs", "Scrape",
           "Snapshot", "fmt_age", "worst"]
