"""The artifact's file names, the one JSON reader of the artifact's files (config.json, generation_config.json,
tokenizer files), and the rules every reader of a user's file follows:
  * `contained`: a file named by a file (an index, a manifest) stays inside that file's directory;
  * `reading`: any failure while reading a file becomes one line naming the file (and the thing in it), cut
    to a sane length, never a traceback nor a dump of the file's bytes;
  * `clip`: a value taken from a file, cut before it goes into a message;
  * `atomic_path` / `made_parents`: an output appears whole or not at all, and the directories made for it
    go again when it fails.
Imports nothing of gptbc but errors, so every phase can use it."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from gptbc.errors import GptbcError, raise_if_interrupted

HF_CONFIG = "config.json"
# What the converter copies beside the weights (those present) and the runtime reads: tokenizer and generation defaults.
TOKENIZER_FILES = [
    "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "generation_config.json",
]
MESSAGE_LIMIT = 300  # characters of an error line made from a foreign exception's text
VALUE_LIMIT = 60  # characters of a value from a file quoted in a message


def clip(value: Any, limit: int = VALUE_LIMIT) -> str:
    """repr() of a value read from a file, cut to `limit` characters: a 5 MB string is not echoed."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text` on one line, at most `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def reading(path: str | Path, what: str = "") -> Iterator[None]:
    """Any failure in the block becomes `PATH: [WHAT: ]corrupt or unreadable (...)`, one line of at most MESSAGE_LIMIT
    characters; a GptbcError passes unchanged, only cut to one line. `what` names the thing inside the file
    (a tensor, a metadata key). Interrupts pass through."""
    try:
        yield
    except GptbcError as err:
        raise GptbcError(one_line(str(err), 2 * MESSAGE_LIMIT)) from None
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except RecursionError:
        raise GptbcError(one_line(f"{path}: {what + ': ' if what else ''}nested too deeply")) from None
    except MemoryError:
        raise GptbcError(one_line(f"{path}: {what + ': ' if what else ''}too large to read")) from None
    except Exception as err:  # noqa: BLE001 - whatever a corrupt file makes a parser raise
        detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise GptbcError(one_line(f"{path}: {what + ': ' if what else ''}corrupt or unreadable ({detail})")) \
            from None


def link_root(directory: Path) -> Path:
    """Where the symbolic links of `directory`'s files may lead: the directory itself, or for a snapshot in the
    Hugging Face cache (`models--owner--name/snapshots/REV/`, its files links to `../../blobs/HASH`) the
    repository's cache folder."""
    directory = Path(directory)
    if directory.parent.name == "snapshots" and (directory.parent.parent / "blobs").is_dir():
        return directory.parent.parent
    return directory


def contained(directory: Path, name: Any, where: str, entry: str) -> Path:
    """`directory / name` for a file that `where` (an index, a manifest) names in its `entry`, refused in one
    line unless it is a plain relative path that stays inside `directory`, symbolic links resolved (a link
    may lead as far as `link_root`)."""
    if not isinstance(name, str) or not name:
        raise GptbcError(f"{where}: {entry} must name a file, got {clip(name)}")
    path = Path(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name or "\x00" in name:
        raise GptbcError(f"{where}: {entry} names {clip(name)}, outside its directory {directory}")
    target = directory / path
    try:
        inside = target.resolve().is_relative_to(link_root(directory).resolve())
    except (OSError, RuntimeError, ValueError):  # a symlink loop, an unreadable link
        inside = False
    if not inside:
        raise GptbcError(f"{where}: {entry} names {clip(name)}, which leads outside its directory {directory}")
    return target


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise GptbcError(f"{path}: file not found") from None
    except OSError as err:
        raise GptbcError(f"{path}: cannot read ({err.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GptbcError(one_line(f"{path}: not valid JSON ({err})")) from None
    except RecursionError:
        raise GptbcError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise GptbcError(f"{path}: expected a JSON object")
    return data


def _missing_parents(path: Path) -> list[Path]:
    """The directories above `path` that do not exist yet, outermost first."""
    missing = []
    for parent in Path(path).absolute().parents:
        if parent.exists() or parent.is_symlink():
            break
        missing.append(parent)
    return missing[::-1]


@contextlib.contextmanager
def made_parents(path: Path, flag: str = "-o") -> Iterator[None]:
    """Create the missing directories above output `path` for the block; remove those it made (when empty) if
    the block fails, so a failed command leaves no trace."""
    made = _missing_parents(path)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _remove_dirs(made)
        raise GptbcError(f"{flag} {path}: cannot create its directory ({err.strerror})") from None
    try:
        yield
    except BaseException:
        _remove_dirs(made)
        raise


def _remove_dirs(made: list[Path]) -> None:
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:  # not empty (something else wrote there meanwhile) or already gone
            break


@contextlib.contextmanager
def atomic_path(path: Path, directory: bool = False, flag: str = "-o") -> Iterator[Path]:
    """A temporary file (or directory) beside `path`, renamed onto it when the block succeeds; removed, and any
    parent directories made for it, when it fails."""
    with made_parents(path, flag):
        try:
            if directory:
                tmp = tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent)
            else:
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix="".join(path.suffixes[-1:]),
                                           dir=path.parent)
                os.close(fd)
        except OSError as err:
            raise GptbcError(f"{flag} {path}: cannot write there ({err.strerror})") from None
        try:
            yield Path(tmp)
            raise_if_interrupted()  # a Ctrl-C swallowed on the way (TVM does) still cancels the output
            if not directory:
                os.replace(tmp, path)
        except BaseException:
            if directory:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            else:
                Path(tmp).unlink(missing_ok=True)
            raise
