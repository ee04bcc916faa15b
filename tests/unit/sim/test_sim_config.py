"""Fault settings, command-line flags and the deterministic text of the simulator."""

from __future__ import annotations

import argparse
import shlex

import pytest

from llmproxy.sim import SimConfig, add_arguments, config_from_args
from llmproxy.sim.config import apply_faults, faults_of
from llmproxy.sim.state import Replica
from llmproxy.sim.textgen import count_prompt_tokens, generate_tokens


def test_apply_faults_sets_and_normalises() -> None:
    cfg = SimConfig()
    apply_faults(cfg, {"error_rate": 1, "hang": True, "cut_after_tokens": 3, "ttft_ms": 0})
    assert faults_of(cfg) == {
        "error_rate": 1.0,
        "error_status": 500,
        "hang": True,
        "slow_factor": 1.0,
        "cut_after_tokens": 3,
        "unhealthy": False,
        "ttft_ms": 0.0,
        "tokens_per_s": 50.0,
    }
    assert isinstance(cfg.error_rate, float)


@pytest.mark.parametrize(
    "updates",
    [
        {"error_rate": -0.1},
        {"error_rate": True},
        {"error_status": 302},
        {"cut_after_tokens": -1},
        {"slow_factor": "2"},
        {"max_concurrency": 3},
        {"hang": True, "unhealthy": 1},
    ],
)
def test_apply_faults_rejects_bad_updates_whole(updates: dict[str, object]) -> None:
    cfg = SimConfig()
    with pytest.raises(ValueError, match=r"must be|unknown fault field"):
        apply_faults(cfg, updates)
    assert cfg == SimConfig()


def test_flags_map_to_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])) == SimConfig()
    ns = parser.parse_args(
        shlex.split(
            "--host 0.0.0.0 --port 9001 --model m --ttft-ms 5 --tokens-per-s 0"
            " --max-concurrency 2 --error-rate 0.5 --error-status 503 --hang"
            " --slow-factor 3 --cut-after-tokens 4 --unhealthy --seed 9"
        )
    )
    assert config_from_args(ns) == SimConfig(
        host="0.0.0.0",
        port=9001,
        model="m",
        ttft_ms=5,
        tokens_per_s=0,
        max_concurrency=2,
        error_rate=0.5,
        error_status=503,
        hang=True,
        slow_factor=3,
        cut_after_tokens=4,
        unhealthy=True,
        seed=9,
    )


def test_delays_follow_slow_factor_and_rate() -> None:
    replica = Replica(SimConfig(ttft_ms=40, tokens_per_s=20, slow_factor=2.5))
    assert replica.first_token_delay() == pytest.approx(0.1)
    assert replica.token_gap() == pytest.approx(0.125)
    replica.cfg.tokens_per_s = 0
    assert replica.token_gap() == 0.0


def test_text_is_a_function_of_the_prompt() -> None:
    first = generate_tokens("hello world", 40)
    assert first == generate_tokens("hello world", 40)
    assert first[:10] == generate_tokens("hello world", 10)
    assert first != generate_tokens("hello there", 40)
    assert not first[0].text.startswith(" ")
    assert all(t.text.startswith(" ") for t in first[1:])
    assert all(-1 < t.logprob < 0 for t in first)
    assert count_prompt_tokens("") == 1
    assert count_prompt_tokens(" a  b\nc ") == 3
