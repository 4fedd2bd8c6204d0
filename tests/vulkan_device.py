"""Is there a Vulkan adapter (wgpu-native) for the tests that execute `--target vulkan` libraries?

Without one (or without the `vulkan` extra) those tests skip with the reason printed; GPTBC_REQUIRE_VULKAN=1
(set by .ci/run) turns that skip into a failure.
"""

from __future__ import annotations

import functools

from requirement import required, skip_or_fail

REQUIRED = required("GPTBC_REQUIRE_VULKAN")


@functools.cache
def why_no_vulkan() -> str | None:
    """None where a Vulkan adapter is there, else why not (one line)."""
    from gptbc.errors import GptbcError

    try:
        from gptbc.runtime import webgpu

        if not webgpu.adapters():
            return webgpu.NO_ADAPTER
    except GptbcError as err:
        return str(err)
    return None


def need_vulkan() -> None:
    """First thing in a test that runs on Vulkan: skip it where there is no adapter, fail it if one is required."""
    why = why_no_vulkan()
    if why is not None:
        message = f"no Vulkan device: {why}"
        skip_or_fail(message, "GPTBC_REQUIRE_VULKAN")
