"""Routing: which route a request matches, and which of its pools serves it.

Both are pure: no I/O, no clock; randomness comes from an injected
``random.Random``.
"""

from llmproxy.routing.split import choose_pool, split_point, sticky_key
from llmproxy.routing.table import RouteTable

__all__ = ["RouteTable", "choose_pool", "split_point", "sticky_key"]
