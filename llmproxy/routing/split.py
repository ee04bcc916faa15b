"""Weighted traffic split between a route's pools (a canary), sticky by key.

With a sticky key, a request's place in the split is ``split_point(key)``: a
stable 64-bit hash of the key mapped to ``[0, 1)``, laid onto the targets'
cumulative weights in the order they are configured. For
``[stable 90, canary 10]``, points below 0.9 go to ``stable``. A user therefore
keeps their pool when weights change as long as their point stays inside their
pool's range: raising the canary (listed last) from 10 to 20 moves only the
users in ``[0.8, 0.9)`` from ``stable`` to ``canary``, and none back. Without
a key, each request draws from the injected ``random.Random``.

Weights are relative and may be 0 at run time (a canary switched off): a
target of weight 0 is never chosen. A split whose weights are all 0, or any
weight is negative, is an error (``ValueError``).

The hash is blake2b with its own personalisation, never Python's ``hash()``
(salted per process): every proxy process puts a key at the same point, and
the point does not correlate with ``consistent_hash``'s ring position for the
same key.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence

from llmproxy.config.schema import RouteConfig, SplitTarget

_PERSON = b"llmproxy.split"
_HEADER_PREFIX = "header:"


def split_point(key: str) -> float:
    """The key's stable point in ``[0, 1)`` (53 bits of a 64-bit blake2b hash)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=_PERSON).digest()
    return (int.from_bytes(digest, "big") >> 11) * 2.0**-53


def sticky_key(
    route: RouteConfig,
    headers: Mapping[str, str],
    api_key: str | None,
    client_ip: str | None,
) -> str | None:
    """The value the route's split sticks on, or ``None`` for a random choice.

    ``route.sticky`` is ``header:NAME`` (looked up lower-cased, so ``headers``
    must be case-insensitive or lower-cased), ``api_key``, ``ip`` or ``none``.
    An empty value counts as missing, so requests without an identity do not
    all land on one point.
    """
    sticky = route.sticky
    if sticky.startswith(_HEADER_PREFIX):
        value = headers.get(sticky[len(_HEADER_PREFIX) :].lower())
    elif sticky == "api_key":
        value = api_key
    elif sticky == "ip":
        value = client_ip
    elif sticky == "none":
        return None
    else:
        raise ValueError(f"route {route.name!r}: unknown sticky mode {sticky!r}")
    return value or None


def choose_pool(split: Sequence[SplitTarget], key: str | None, rng: random.Random) -> str:
    """The pool for one request: by ``split_point(key)``, or at random without a key.

    A single target is returned as is, without drawing from ``rng``. Weights
    are checked on every call because the admin API may change them at run time.
    """
    if len(split) == 1:
        only = split[0]
        if not only.weight > 0:
            raise ValueError(f"split has no target with a positive weight: {only.weight}")
        return only.pool
    total = 0.0
    for target in split:
        if target.weight < 0:
            raise ValueError(f"split weight of pool {target.pool!r} is negative: {target.weight}")
        total += target.weight
    if not total > 0:
        raise ValueError(f"split has no target with a positive weight: {list(split)}")
    unit = rng.random() if key is None else split_point(key)
    point = unit * total
    cum = 0.0
    last = split[0].pool
    for target in split:
        if target.weight > 0:
            cum += target.weight
            if point < cum:
                return target.pool
            last = target.pool
    # Float rounding put the point on the very end: it belongs to the last range.
    return last
