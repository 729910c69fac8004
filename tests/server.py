"""Test access to the package's server launcher (tests import ``from server import Server``)."""

from sglang_dsv4.server_process import Server, free_port, launch_and_expect_failure

__all__ = ["Server", "free_port", "launch_and_expect_failure"]
