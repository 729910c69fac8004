"""Triton kernels for Hopper (sm90); each has a pure-torch twin in ``sglang_dsv4.ref``."""
