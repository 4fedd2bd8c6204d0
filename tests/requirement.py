"""Tests that need something this machine may lack (a Vulkan adapter, qemu and a cross compiler): they skip with
the reason printed where it is missing, and fail instead where CI says it has it (GPTBC_REQUIRE_*=1), so a skip
can never hide a break there."""

from __future__ import annotations

import os

import pytest


def required(variable: str) -> bool:
    return os.environ.get(variable) == "1"


def skip_or_fail(message: str, variable: str) -> None:
    """`message` says what is missing: a failure when `variable` is 1, else a skip that prints it."""
    if required(variable):
        pytest.fail(f"{variable}=1 but {message}")
    pytest.skip(message)
