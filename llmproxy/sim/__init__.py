"""The simulated replica: a vLLM / TGI look-alike for testing without a GPU.

See ``ARCHITECTURE.md`` §4. Public names: :class:`SimConfig`,
:func:`build_app`, :func:`serve`, :func:`sim_server` / :class:`SimServer`,
:func:`add_arguments`, :func:`config_from_args`.
"""

from llmproxy.sim.app import SimServer, build_app, serve, sim_server
from llmproxy.sim.cli import add_arguments, config_from_args
from llmproxy.sim.config import SimConfig

__all__ = [
    "SimConfig",
    "SimServer",
    "add_arguments",
    "build_app",
    "config_from_args",
    "serve",
    "sim_server",
]
