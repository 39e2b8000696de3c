"""Pseudonymized user ids (streaming/pseudonym.py): the hash, the key chain, the key file."""

from __future__ import annotations

import hashlib
import hmac
import multiprocessing
import stat

import pytest
from pydantic import SecretStr

from streaming.pseudonym import (
    PSEUDONYM_HEX_CHARS,
    Pseudonymizer,
    PseudonymKeyError,
    forget_marker,
    key_file_path,
    load_or_create_key_file,
    parse_keys,
    pseudonym_step,
    write_key_file,
)
from streaming.settings import load_settings

K1, K2 = bytes(range(32)), bytes(range(1, 33))


def test_a_pseudonym_is_the_truncated_hmac_sha256_of_the_id():
    expected = hmac.new(K1, "alice".encode(), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX_CHARS]
    p = Pseudonymizer((K1,))
    assert p("alice") == expected and len(expected) == 32
    assert p("alice") == p("alice") and p("alice") != p("bob")
    assert Pseudonymizer((K2,))("alice") != expected  # another key, another pseudonym
    assert "alice" not in p("alice")


def test_a_rotated_chain_maps_old_pseudonyms_without_the_raw_ids():
    old = Pseudonymizer((K1,))
    new = old.rotated(K2)
    assert new.generation == 2
    assert new("alice") == pseudonym_step(K2, old("alice"))  # the migration only needs the stored pseudonym
    assert new.chain("alice") == [old("alice"), new("alice")]


def test_ids_that_are_not_plain_text_hash_too():
    p = Pseudonymizer((K1,))
    for odd in ("\ud800", "ü" * 256, " x ", "7"):
        assert len(p(odd)) == 32


def test_the_forget_marker_is_one_way_and_not_the_pseudonym():
    p = Pseudonymizer((K1,))("alice")
    assert forget_marker(p) != p and len(forget_marker(p)) == 32 and forget_marker(p) == forget_marker(p)


@pytest.mark.parametrize("text, match", [
    ("", "no key"),
    ("# only a comment\n", "no key"),
    ("zz" * 32, "key #1 is not hex"),
    (K1.hex() + ",0102", "key #2 has 2 bytes"),
])
def test_bad_keys_are_refused_naming_the_key(text, match):
    with pytest.raises(PseudonymKeyError, match=match):
        parse_keys(text, "STREAMREC_PSEUDONYM_KEYS")


def test_keys_come_from_the_setting_before_the_file(tmp_path):
    s = load_settings(data_dir=tmp_path, pseudonym_keys=SecretStr(f"{K1.hex()},{K2.hex()}"))
    p = Pseudonymizer.from_settings(s)
    assert p.keys == (K1, K2)
    assert not key_file_path(s).exists()  # nothing created when the keys are given


def test_the_embedded_default_creates_a_private_key_file_once(tmp_path):
    s = load_settings(data_dir=tmp_path)
    with pytest.raises(PseudonymKeyError, match="does not exist"):
        Pseudonymizer.from_settings(s, create=False)
    first = Pseudonymizer.from_settings(s)
    path = key_file_path(s)
    assert path == tmp_path / "secrets" / "pseudonym.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert Pseudonymizer.from_settings(s).keys == first.keys  # kept, not remade
    write_key_file(path, (*first.keys, K2))
    assert Pseudonymizer.from_settings(s).keys == (*first.keys, K2)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _create(path: str, out) -> None:
    from pathlib import Path

    out.put(load_or_create_key_file(Path(path), create=True))


def test_processes_starting_together_agree_on_one_key(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_create, args=(str(tmp_path / "k" / "pseudonym.key"), out)) for _ in range(4)]
    for p in procs:
        p.start()
    keys = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert len(set(keys)) == 1 and len(keys[0]) == 1
    assert [f.name for f in (tmp_path / "k").iterdir()] == ["pseudonym.key"]  # no temp file left
