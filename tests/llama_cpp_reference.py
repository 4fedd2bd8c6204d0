"""llama.cpp's server rules written out again, independently of gptbc/serve, for the tests to compare against
(read from llama.cpp's tools/server at 0c1e57098; docs/llama-cpp-protocol.md has the source lines)."""

from __future__ import annotations

SNIPPET = "\n\n--- snippet ---\n\n"  # format_prompt_infill's chunk separator without a FIM_SEP token


def infill_prompt(engine, prefix: str, suffix: str, typed: str, extra: list[dict], repo: int | None = None,
                  sep: int | None = None) -> list[int]:
    """format_prompt_infill when nothing needs cutting: repository context, then
    [FIM_PRE] prefix typed [FIM_SUF] suffix [FIM_MID]."""
    enc, f = engine.encode, engine.fim
    ids = [repo, *enc("myproject\n")] if repo is not None else []
    for chunk in extra:
        ids += [sep, *enc(chunk.get("filename", "tmp") + "\n")] if sep is not None else enc(SNIPPET)
        ids += enc(chunk["text"])
    if sep is not None:
        ids += [sep, *enc("filename\n")]
    return ids + [f["prefix"]["id"], *enc(prefix), *(enc(typed) if typed else []), f["suffix"]["id"],
                  *enc(suffix), f["middle"]["id"]]


def cut_at_indent(text: str, n_indent: int) -> str:
    """n_indent: after the first line, the first line indented less than n_indent (spaces and tabs count one
    each) ends the text right after its indentation; an empty line counts as indented 0 once its newline
    came. A last line with nothing after its indentation is still undecided and stays."""
    lines = text.split("\n")
    out = [lines[0]]
    for i, line in enumerate(lines[1:], start=1):
        body = line.lstrip(" \t")
        indent = len(line) - len(body)
        decided = bool(body) or i < len(lines) - 1
        if decided and indent < n_indent:
            out.append(line[:indent])
            return "\n".join(out)
        out.append(line)
    return "\n".join(out)


def ends_on_newline_token(engine, content: str, ids: list[int]) -> int | None:
    """t_max_predict_ms: the k for which `content` is the text of ids[:k] and ids[k-1]'s own text holds a
    newline (None when there is no such k)."""
    for k in range(1, len(ids) + 1):
        if engine.decode_text(ids[:k]) == content:
            return k if "\n" in engine.decode_text(ids[k - 1:k]) else None
    return None
