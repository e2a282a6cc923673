"""API keys and quotas, the pure part: the key ring (hashes only, malformed entries named by
field), constant-time lookups, token buckets and open-call limits on a fake clock."""
from __future__ import annotations

import json

import pytest

from services.scheduler.core.quota import ApiKey, KeyRing, KeyRingError, Quotas, Throttled, digest, new_key


def ring(*entries: dict) -> KeyRing:
    return KeyRing.from_json(json.dumps({"keys": list(entries)}))


def test_new_key_entry_holds_only_the_hash_and_looks_up():
    key, entry = new_key("team-a", rate_per_s=2, max_concurrent=3)
    assert key.startswith("prism_") and len(key) > 40
    assert key not in json.dumps(entry) and entry["sha256"] == digest(key)
    keys = ring(entry)
    found = keys.lookup(key)
    assert found == ApiKey("team-a", digest(key), rate_per_s=2.0, max_concurrent=3)
    assert keys.lookup(key + "x") is None and keys.lookup("") is None


@pytest.mark.parametrize("entry, field", [
    ({"name": "", "sha256": "0" * 64}, "keys[0].name"),
    ({"name": "a", "sha256": "XYZ"}, "keys[0].sha256"),
    ({"name": "a", "sha256": "0" * 64, "rate_per_s": -1}, "keys[0].rate_per_s"),
    ({"name": "a", "sha256": "0" * 64, "burst": 1.5}, "keys[0].burst"),
    ({"name": "a", "sha256": "0" * 64, "max_concurrent": True}, "keys[0].max_concurrent"),
    ({"name": "a", "sha256": "0" * 64, "admin": "yes"}, "keys[0].admin"),
    ({"name": "a", "sha256": "0" * 64, "key": "plaintext"}, "keys[0].key"),
])
def test_malformed_entries_are_named(entry, field):
    with pytest.raises(KeyRingError, match=field.replace("[", r"\[").replace("]", r"\]")):
        ring(entry)


def test_ring_level_errors():
    with pytest.raises(KeyRingError, match="not JSON"):
        KeyRing.from_json("{keys")
    with pytest.raises(KeyRingError, match="expected"):
        KeyRing.from_json('{"key": []}')
    with pytest.raises(KeyRingError, match="used twice"):
        ring({"name": "a", "sha256": "0" * 64}, {"name": "a", "sha256": "1" * 64})
    with pytest.raises(KeyRingError, match="same key"):
        ring({"name": "a", "sha256": "0" * 64}, {"name": "b", "sha256": "0" * 64})
    assert not KeyRing().enabled and len(ring({"name": "a", "sha256": "0" * 64})) == 1


def test_token_bucket_admits_the_burst_then_the_rate():
    now = [100.0]
    quotas = Quotas(clock=lambda: now[0])
    key = ApiKey("a", "0" * 64, rate_per_s=2.0, burst=3)
    for _ in range(3):
        quotas.acquire(key).release()
    with pytest.raises(Throttled) as exc:
        quotas.acquire(key)
    assert exc.value.retry_after_s == pytest.approx(0.5) and "rate_per_s" in str(exc.value)
    now[0] += 0.25  # half a token: still too early, and the refused call used nothing
    with pytest.raises(Throttled) as exc:
        quotas.acquire(key)
    assert exc.value.retry_after_s == pytest.approx(0.25)
    now[0] += 0.25
    quotas.acquire(key).release()
    now[0] += 100  # the bucket refills to its size only
    for _ in range(3):
        quotas.acquire(key).release()
    with pytest.raises(Throttled):
        quotas.acquire(key)


def test_open_call_limit_and_release():
    quotas = Quotas()
    key, other = ApiKey("a", "0" * 64, max_concurrent=2), ApiKey("b", "1" * 64, max_concurrent=1)
    first, second = quotas.acquire(key), quotas.acquire(key)
    with pytest.raises(Throttled, match="max_concurrent"):
        quotas.acquire(key)
    quotas.acquire(other)  # another key is not affected
    first.release()
    first.release()  # idempotent
    assert quotas.open_calls("a") == 1
    quotas.acquire(key)
    assert quotas.open_calls("a") == 2
    second.release()
    assert quotas.open_calls("a") == 1


def test_prism_keys_new_writes_only_the_hash(tmp_path):
    from typer.testing import CliRunner

    from prism.cli import app

    ring_file = tmp_path / "keys.json"
    out = CliRunner().invoke(app, ["keys", "new", "team-a", "--rate", "2", "--concurrency", "3",
                                   "--add-to", str(ring_file)])
    assert out.exit_code == 0, out.output
    key = out.stdout.strip().splitlines()[0]
    assert key not in ring_file.read_text()
    found = KeyRing.from_json(ring_file.read_text()).lookup(key)
    assert found is not None and (found.name, found.rate_per_s, found.max_concurrent) == ("team-a", 2.0, 3)
    again = CliRunner().invoke(app, ["keys", "new", "team-a", "--add-to", str(ring_file)])
    assert again.exit_code == 2 and "used twice" in again.output
    assert len(KeyRing.from_json(ring_file.read_text())) == 1  # nothing written


def test_scheduler_config_names_a_bad_key_ring(tiny_models, tmp_path, capsys):
    from prism.runtime.config import config_from_cli
    from services.scheduler.config import SchedulerConfig

    argv = ["--model-dir", str(tiny_models["llava"])]
    with pytest.raises(SystemExit) as exc:
        config_from_cli(SchedulerConfig, env_prefix="PRISM_SCHEDULER", argv=argv,
                        environ={"PRISM_SCHEDULER_API_KEYS": '{"keys": [{"name": "a"}]}'})
    assert exc.value.code == 2 and "--api-keys (PRISM_SCHEDULER_API_KEYS): keys[0].sha256" in capsys.readouterr().err
    bad = tmp_path / "keys.json"
    bad.write_text("[]")
    with pytest.raises(SystemExit):
        config_from_cli(SchedulerConfig, env_prefix="PRISM_SCHEDULER", argv=[*argv, "--api-keys-file", str(bad)],
                        environ={})
    assert "--api-keys-file" in capsys.readouterr().err
    _, entry = new_key("ops", admin=True)
    config = config_from_cli(SchedulerConfig, env_prefix="PRISM_SCHEDULER", argv=argv,
                             environ={"PRISM_SCHEDULER_API_KEYS": json.dumps({"keys": [entry]})})
    assert [k.name for k in config.key_ring().keys] == ["ops"]
