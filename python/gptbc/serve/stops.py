"""Stop rules the llama.cpp protocol adds on top of the engine's own (eos, stop strings, max tokens), applied to
the text as it streams: n_indent."""

from __future__ import annotations


class IndentStop:
    """llama.cpp's n_indent: after the first line, a line indented less than n_indent (and not blank) ends the
    completion; the text is cut at that line's first non-blank character. Text whose indentation is still
    undecided is held back."""

    def __init__(self, n_indent: int):
        self.n_indent, self.pending, self.seen_newline = n_indent, "", False

    def feed(self, text: str) -> tuple[str, bool]:
        out = ""
        for ch in text:
            if not self.seen_newline:
                out += ch
                self.seen_newline = ch == "\n"
                continue
            if self.pending is not None and ch in " \t":
                self.pending += ch
                continue
            if self.pending is not None:
                indent = len(self.pending)
                if ch != "\n" and indent < self.n_indent:
                    return out + self.pending, True
                out += self.pending
                self.pending = None if ch != "\n" else ""
            out += ch
            if ch == "\n":
                self.pending = ""
        return out, False

    def flush(self) -> str:
        out, self.pending = (self.pending or ""), ""
        return out
