"""Stop rules the llama.cpp protocol adds on top of the engine's own (eos, stop strings, max tokens), applied to
the text as it streams: n_indent and t_max_predict_ms."""

from __future__ import annotations


class IndentStop:
    """llama.cpp's n_indent: after the first line, a line indented less than n_indent ends the completion, and
    so does an empty line (llama.cpp counts its indentation as 0 once the newline follows). The text is cut
    after that line's indentation: a line's first character that is not a space or a tab decides it. Spaces
    and tabs count one each, as in llama.cpp. Indentation still undecided is held back."""

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
                if len(self.pending) < self.n_indent:
                    return out + self.pending, True
                out += self.pending
                self.pending = None
            out += ch
            if ch == "\n":
                self.pending = ""
        return out, False

    def flush(self) -> str:
        out, self.pending = (self.pending or ""), ""
        return out


def past_time_limit(piece: str, elapsed_ms: float, limit_ms: int | None) -> bool:
    """llama.cpp's t_max_predict_ms: once `elapsed_ms` since the first token is past the limit, stop on the
    first piece that itself holds a newline, so that the answer ends at a line's end, never halfway through
    one (a newline earlier in the answer does not count). 0 or None is no limit."""
    return bool(limit_ms) and elapsed_ms > limit_ms and "\n" in piece
