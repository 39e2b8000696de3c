"""The privacy half of issue 15 on Kubernetes (k8s/README.md, "Security"; k8s/RUNBOOK.md, "Forget a
user", "Rotate the pseudonym key"):

* the pseudonym key chain (Secret streamrec-pseudonym, no data in git) reaches exactly the pods that
  see raw user ids -- ingest, the serving Ray pods, the privacy Jobs -- and never the feature job,
  training or the trigger, which only ever see pseudonyms;
* the one-off Jobs of k8s/oneoff/ are CronJobs that never run by themselves, run commands the CLI
  has, and carry the credentials their command needs: `ingest --fresh` exactly ingest's,
  `forget` the privacy Kafka user and nothing else, `rotate-key` Redis, the read-only Kafka user and
  a durable place for the new chain.

(The topic, the ACLs and the network flows: tests/k8s/test_security.py.)
"""

from __future__ import annotations

import calendar
import re
import shlex

import pytest
from typer.testing import CliRunner

from services.cli import app
from tests.k8s.test_security import (
    env_of,
    manifest_pods,
    of_kind,
    one,
    pod_template,
    streamrec_containers,
    streamrec_env,
)

PSEUDONYM_SECRET = "streamrec-pseudonym"
KEYS_VAR = "STREAMREC_PSEUDONYM_KEYS"
# The pods that handle raw user ids (test_security's names): they hash them.
RAW_ID_PODS = {"ingest", "ingest-fresh", "serve-head", "serve-worker", "forget", "rotate-key"}
# Pods that must only ever see pseudonyms.
PSEUDONYM_ONLY_PODS = {"features", "trigger", "train-head", "train-worker", "train-submitter"}
ONEOFF_LABEL = "streamrec.io/oneoff"
# the one-off CronJobs, by their streamrec.io/oneoff label
ONEOFF = {"ingest-fresh": "streamrec-ingest-fresh", "forget": "streamrec-forget",
          "rotate-pseudonym-key": "streamrec-rotate-pseudonym-key"}


@pytest.fixture(scope="module")
def endpoints():
    return {e.name: e for e in manifest_pods()}


def _refers_to_the_secret(ep, container) -> bool:
    env = [e for e in container.get("env", []) if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name")
           == PSEUDONYM_SECRET]
    env_from = [r for r in container.get("envFrom", []) if r.get("secretRef", {}).get("name") == PSEUDONYM_SECRET]
    volumes = [v for v in ep.template["spec"].get("volumes", []) if v.get("secret", {}).get("secretName")
               == PSEUDONYM_SECRET]
    return bool(env or env_from or volumes)


def test_the_pseudonym_secret_has_no_data():
    secret = one("Secret", PSEUDONYM_SECRET)
    assert not secret.get("data") and not secret.get("stringData"), (
        "a key in git is a known key, and re-applying would reset every pseudonym: patch it (README)")
    assert KEYS_VAR not in streamrec_env(), "the key belongs in the Secret, not in the ConfigMap"


def test_the_pseudonym_key_reaches_exactly_the_pods_that_see_raw_ids(endpoints):
    containers = streamrec_containers(endpoints)
    seen = {ep.name for ep, _ in containers}
    assert RAW_ID_PODS | PSEUDONYM_ONLY_PODS <= seen, "a pod of the lists is gone: update them"
    for ep, c in containers:
        env = env_of(c)
        if ep.name in RAW_ID_PODS:
            ref = env[KEYS_VAR]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": PSEUDONYM_SECRET, "key": KEYS_VAR}, (ep.name, ref)  # not optional: fail closed
            assert "STREAMREC_PSEUDONYM_KEY_FILE" not in env, f"{ep.name}: the key comes from the Secret only"
        else:
            assert not _refers_to_the_secret(ep, c), f"{ep.name} sees only pseudonyms: no pseudonym key"
            assert not {KEYS_VAR, "STREAMREC_PSEUDONYM_KEY_FILE"} & set(env), ep.name


def _oneoff_cronjobs() -> dict[str, dict]:
    return {cj["metadata"]["labels"][ONEOFF_LABEL]: cj for cj in of_kind("CronJob")
            if ONEOFF_LABEL in cj["metadata"].get("labels", {})}


def test_the_one_off_jobs_exist_and_never_run_by_themselves():
    found = _oneoff_cronjobs()
    assert {k: v["metadata"]["name"] for k, v in found.items()} == ONEOFF
    for name, cj in found.items():
        assert cj["spec"]["suspend"] is True, f"{name}: a template, started with `kubectl create job --from`"
        _minute, _hour, dom, month, dow = cj["spec"]["schedule"].split()
        # a day that does not exist (31 February): unsuspended by mistake, it still never fires
        assert dow == "*" and int(dom) > calendar.monthrange(2028, int(month))[1], (name, cj["spec"]["schedule"])
        job = cj["spec"]["jobTemplate"]["spec"]
        assert job.get("ttlSecondsAfterFinished") is not None and job.get("activeDeadlineSeconds"), name
        labels = pod_template(cj)["metadata"]["labels"]
        assert labels[ONEOFF_LABEL] == name and labels.items() >= {"app.kubernetes.io/name": "streamrec"}.items()
    assert found["ingest-fresh"]["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0, "a retry archives again"
    assert found["rotate-pseudonym-key"]["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0, "each run adds a key"


def _streamrec_argv(container: dict) -> list[str]:
    """The streamrec command line a container runs: its exec form, or the one inside `sh -c`."""
    command = container["command"]
    if command[0] == "streamrec":
        return list(command)
    assert command[:2] == ["sh", "-c"], command
    (line,) = re.findall(r"streamrec [^&|;]+", command[2])
    return shlex.split(line)


def _container(name: str) -> dict:
    (c,) = pod_template(one("CronJob", ONEOFF[name]))["spec"]["containers"]
    return c


@pytest.mark.parametrize("name", sorted(ONEOFF))
def test_the_one_off_commands_exist_in_the_cli(name):
    argv = _streamrec_argv(_container(name))
    result = CliRunner().invoke(app, [*argv[1:], "--help"])
    assert result.exit_code == 0, f"`{' '.join(argv)}` is not a valid streamrec command:\n{result.output}"


def test_the_forget_job_takes_the_user_id_from_its_env():
    c = _container("forget")
    argv = _streamrec_argv(c)
    assert argv[:2] == ["streamrec", "forget"]
    (var,) = re.fullmatch(r"\$\((\w+)\)", argv[2]).groups()  # expanded by the kubelet, no shell
    assert env_of(c)[var]["value"] == "", "no user id in git: set it per run (RUNBOOK.md)"


def test_the_ingest_fresh_job_has_ingests_credentials():
    """The runbook's old recipe ran `ingest --fresh` from the feature pod, with the read-only Kafka
    user and no pseudonym key: it could not join the group nor pseudonymize. Now it has ingest's."""
    dep = one("Deployment", "streamrec-ingest")
    (ingest,) = pod_template(dep)["spec"]["containers"]
    fresh = _container("ingest-fresh")
    assert _streamrec_argv(fresh)[:3] == ["streamrec", "ingest", "--fresh"]
    prefixes = ("STREAMREC_KAFKA_", "STREAMREC_REDIS", "STREAMREC_PSEUDONYM")

    def secrets(c: dict) -> dict:
        return {k: v for k, v in env_of(c).items() if k.startswith(prefixes)}

    assert secrets(fresh) == secrets(ingest)
    spec, dspec = pod_template(one("CronJob", ONEOFF["ingest-fresh"]))["spec"], pod_template(dep)["spec"]
    assert spec["serviceAccountName"] == dspec["serviceAccountName"]
    assert "ports" not in fresh, "no `metrics` port: Prometheus must not scrape it as an ingest pod"


def test_the_new_key_chain_survives_the_pod():
    """rotate-key keeps its resumable state (new key included) under the data dir and deletes it at
    the end, leaving --keys-out the only copy of the new chain: it must be on the shared volume, not in
    the pod (a lost pod would orphan every pseudonym). RUNBOOK.md moves it into the Secret."""
    cj = one("CronJob", ONEOFF["rotate-pseudonym-key"])
    c = _container("rotate-pseudonym-key")
    argv = _streamrec_argv(c)
    assert argv[:3] == ["streamrec", "privacy", "rotate-key"] and "--yes" in argv
    out = argv[argv.index("--keys-out") + 1]
    (mount,) = [m for m in c["volumeMounts"] if out.startswith(m["mountPath"].rstrip("/") + "/")]
    (volume,) = [v for v in pod_template(cj)["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume.get("persistentVolumeClaim", {}).get("claimName") == "streamrec-data", volume
    assert mount["mountPath"] == streamrec_env()["STREAMREC_DATA_DIR"]
    env = env_of(c)
    assert env["STREAMREC_KAFKA_SASL_USERNAME"]["value"] == "streamrec-ops", "committed offsets, read-only"
