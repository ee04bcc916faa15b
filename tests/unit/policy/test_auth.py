"""Client API keys: parsing, constant-time lookup, the hash-key command."""

from __future__ import annotations

import hashlib
import hmac

import pytest
import yaml

from llmproxy.policy.auth import (
    ApiKeyConfig,
    AuthConfig,
    KeyLimits,
    KeyRing,
    auth_problems,
    generate_key,
    hash_key,
    hash_key_command,
    parse_bearer,
    validate_sha256,
)

ALICE_KEY = "sk-alice-0123456789abcdefghij"
BOB_KEY = "sk-bob-0123456789abcdefghijkl"


def ring() -> KeyRing:
    return KeyRing(
        AuthConfig(
            enabled=True,
            keys=(
                ApiKeyConfig("alice", hash_key(ALICE_KEY), requests_per_minute=60),
                ApiKeyConfig("bob", hash_key(BOB_KEY), max_concurrent=2, can_target_pool=True),
            ),
        )
    )


def test_hash_key_is_sha256_hex() -> None:
    assert hash_key("sk-x") == hashlib.sha256(b"sk-x").hexdigest()
    assert validate_sha256(hash_key("sk-x")) is None


def test_generated_keys_are_distinct_and_url_safe() -> None:
    first, second = generate_key(), generate_key()
    assert first != second
    assert first.startswith("sk-")
    assert len(first) == 46
    assert parse_bearer(f"Bearer {first}") == first


def test_right_key_authenticates_with_its_name_and_limits() -> None:
    alice = ring().authenticate(f"Bearer {ALICE_KEY}")
    assert alice is not None
    assert alice.name == "alice"
    assert alice.sha256 == hash_key(ALICE_KEY)
    assert alice.limits == KeyLimits(requests_per_minute=60)
    assert not alice.can_target_pool
    bob = ring().authenticate(f"Bearer {BOB_KEY}")
    assert bob is not None
    assert bob.name == "bob"
    assert bob.limits == KeyLimits(max_concurrent=2)
    assert bob.can_target_pool


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer ",
        "Bearer",
        "Bearer    ",
        f"Bearer {ALICE_KEY}x",
        f"Bearer {ALICE_KEY[:-1]}",
        "Bearer sk-wrong",
        f"Basic {ALICE_KEY}",
        f"Token {ALICE_KEY}",
        ALICE_KEY,
        f"Bearer {ALICE_KEY} extra",
        f"Bearer{ALICE_KEY}",
    ],
)
def test_missing_malformed_or_wrong_key_is_refused(header: str | None) -> None:
    assert ring().authenticate(header) is None


@pytest.mark.parametrize(
    "header",
    [
        f"bearer {ALICE_KEY}",
        f"BEARER {ALICE_KEY}",
        f"Bearer   {ALICE_KEY}  ",
        f"  Bearer {ALICE_KEY}",
        f"Bearer\t{ALICE_KEY}",
    ],
)
def test_scheme_case_and_surrounding_spaces_are_accepted(header: str) -> None:
    key = ring().authenticate(header)
    assert key is not None
    assert key.name == "alice"


def test_an_empty_ring_accepts_nothing() -> None:
    empty = KeyRing(AuthConfig(enabled=True))
    assert len(empty) == 0
    assert empty.authenticate(f"Bearer {ALICE_KEY}") is None


class CountingCompare:
    def __init__(self) -> None:
        self.calls = 0
        self._real = hmac.compare_digest

    def __call__(self, a: bytes, b: bytes) -> bool:
        self.calls += 1
        return self._real(a, b)


@pytest.mark.parametrize("header", [f"Bearer {ALICE_KEY}", f"Bearer {BOB_KEY}", "Bearer sk-no"])
def test_every_configured_key_is_compared_whichever_matches(
    monkeypatch: pytest.MonkeyPatch, header: str
) -> None:
    keys = ring()
    counter = CountingCompare()
    monkeypatch.setattr(hmac, "compare_digest", counter)
    keys.authenticate(header)
    assert counter.calls == len(keys) == 2


def test_validate_sha256() -> None:
    assert validate_sha256("a" * 64) is None
    assert validate_sha256("A" * 64) == "must be lower-case hex"
    problem = validate_sha256("abc")
    assert problem is not None
    assert "64 hex digits" in problem
    assert validate_sha256("g" * 64) is not None


def test_auth_problems_name_the_entry() -> None:
    good = hash_key(ALICE_KEY)
    cfg = AuthConfig(
        enabled=True,
        keys=(
            ApiKeyConfig("alice", good),
            ApiKeyConfig("alice", good),
            ApiKeyConfig("carol", "nothex"),
        ),
    )
    problems = dict(auth_problems(cfg))
    assert problems.keys() == {"keys[1].sha256", "keys[1].name", "keys[2].sha256"}
    assert auth_problems(AuthConfig(enabled=True)) == [
        ("keys", "auth is enabled but no key is configured")
    ]
    assert auth_problems(AuthConfig()) == []


def test_hash_key_command_output_is_yaml_with_the_hash() -> None:
    text = hash_key_command(ALICE_KEY, "alice")
    assert yaml.safe_load(text) == [{"name": "alice", "sha256": hash_key(ALICE_KEY)}]
    assert ALICE_KEY not in text  # A key the user gave is not echoed back.


def test_hash_key_command_generates_and_shows_a_new_key_once() -> None:
    text = hash_key_command(None, "team: search")
    (entry,) = yaml.safe_load(text)
    assert entry["name"] == "team: search"
    shown = [w for w in text.split() if w.startswith("sk-")]
    assert len(shown) == 1
    assert entry["sha256"] == hash_key(shown[0])
    assert ring().authenticate(f"Bearer {shown[0]}") is None
    assert KeyRing(AuthConfig(True, (ApiKeyConfig(**entry),))).authenticate(f"Bearer {shown[0]}")


def test_hash_key_command_warns_about_short_keys_and_refuses_bad_ones() -> None:
    text = hash_key_command("sk-short", "x")
    assert "Warning" in text
    assert yaml.safe_load(text) == [{"name": "x", "sha256": hash_key("sk-short")}]
    assert hash_key_command("  sk-short  ", "x") == text
    for bad in ("", "   ", "sk a"):
        with pytest.raises(ValueError, match="whitespace"):
            hash_key_command(bad, "x")
