"""Parsing our hand-written TVMScript kernels without TVM 0.27's stack walks.

The kernels (kernels.py, kernels_int8.py, kernels_arm.py, kernels_gpu.py) are TVMScript, parsed each time a
library is built. Two lookups in TVM 0.27's parser build Python's full `inspect` stack (a FrameInfo with source
lines for every frame: file reads and module resolution), though they read almost none of it:

- every macro call (`T.macro`: our tiles) finds the parser by walking the caller frames for a global, through
  `inspect.getouterframes` — 2 of the 15 s of a tiny int8 build; more under pytest, whose stacks are deep;
- every `T.prim_func` takes `inspect.stack()` for `is_defined_in_class` (the source line of frame 2) and
  `resolve_closure_vars` (the frames themselves) — 1 s more.

`install()` replaces both with walks that read only that: the same frames, in the same order, source lines only
for the first three. It does so only on the TVM version it was written against, whose code these mirror (a
newer TVM keeps its own; test_kernels checks that the replacement is installed here and that kernels parse to the
same TIR with and without it).
"""

from __future__ import annotations

import inspect
import sys
import types

SOURCE_FRAMES = 3  # frames whose source line is read (is_defined_in_class reads frame 2's)
ORIGINAL: dict = {}  # what install() replaced


def _find_parser_def(self):
    """ScriptMacro._find_parser_def: the innermost caller frame whose globals hold the parser."""
    from tvm.script.parser.core.parser import ScriptMacro

    frame = sys._getframe(1)
    while frame is not None:
        parser = frame.f_globals.get(ScriptMacro.parser_object_name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{ScriptMacro.parser_object_name} not available")


def _stack(context: int = 1) -> list[inspect.FrameInfo]:
    """inspect.stack() with source lines for the first SOURCE_FRAMES frames only (code_context None after)."""
    out = []
    frame = sys._getframe(1)
    while frame is not None:
        if len(out) < SOURCE_FRAMES:
            info = inspect.getframeinfo(frame, context)
            fields = (frame, *tuple(info))
        else:
            info, fields = None, (frame, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name, None, None)
        # Python 3.11 added `positions` (a keyword of FrameInfo); 3.10's FrameInfo is a plain named tuple
        out.append(inspect.FrameInfo(*fields, positions=getattr(info, "positions", None))
                   if sys.version_info >= (3, 11) else inspect.FrameInfo(*fields))
        frame = frame.f_back
    return out


class _Inspect(types.ModuleType):
    """The `inspect` module as tirx's prim_func entry sees it: everything from inspect, `stack` lighter."""

    def __init__(self):
        super().__init__("inspect")
        self.stack = _stack

    def __getattr__(self, name: str):
        return getattr(inspect, name)


def install() -> bool:
    """Put the light lookups in place (once) on TVM 0.27; False where this TVM is another (nothing replaced)."""
    import tvm
    from tvm.script.parser.core import parser
    from tvm.tirx.script.parser import entry

    if not str(tvm.__version__).startswith("0.27."):
        return False
    if parser.ScriptMacro._find_parser_def is not _find_parser_def:
        ORIGINAL["find_parser_def"] = parser.ScriptMacro._find_parser_def
        parser.ScriptMacro._find_parser_def = _find_parser_def
    if not isinstance(entry.inspect, _Inspect):
        ORIGINAL["inspect"] = entry.inspect
        entry.inspect = _Inspect()
    return True


def uninstall() -> None:
    """TVM's own lookups back (for the test that compares both)."""
    from tvm.script.parser.core import parser
    from tvm.tirx.script.parser import entry

    if "find_parser_def" in ORIGINAL:
        parser.ScriptMacro._find_parser_def = ORIGINAL.pop("find_parser_def")
    if "inspect" in ORIGINAL:
        entry.inspect = ORIGINAL.pop("inspect")


def installed() -> bool:
    from tvm.script.parser.core import parser
    from tvm.tirx.script.parser import entry

    return parser.ScriptMacro._find_parser_def is _find_parser_def and isinstance(entry.inspect, _Inspect)
