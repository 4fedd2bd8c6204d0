"""Draft-model speculation: a smaller model with the target's vocabulary proposes k tokens for every drafting
request, one batched draft call per drafted position, and the target verifies them all in one call.

The draft keeps a KV-cache sequence of its own per request, holding a prefix of the request's tokens (prompt
and output). Before drafting it catches up on what it has not seen (the whole prompt the first time; after a
verify, the target's own token and any draft tokens it had not fed) in one call for every request, then feeds
each drafted token back in one `decode_batch` call per position. After the verify, `settle` pops what the
target rejected, so the draft's KV again holds only tokens the request has. Like the scheduler, this module
imports no TVM: the draft's runner is anything with the scheduler's Runner methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from gptbc.errors import GptbcError
from gptbc.runtime.sampling import SamplingParams, probabilities
from gptbc.runtime.tokenizer import vocabulary


def check_same_vocabulary(target_dir: Path, target_size: int, draft_dir: Path, draft_size: int) -> None:
    """The draft must speak the target's token ids: the same vocabulary size and, where both have tokenizer
    files, the same string for every id. Refused in one line naming the first id whose strings differ."""
    if target_size != draft_size:
        raise GptbcError(f"--draft {draft_dir}: vocabulary of {draft_size} tokens, the target {target_dir} has "
                         f"{target_size} (a draft model must share the target's tokenizer)")
    ours, theirs = vocabulary(Path(target_dir)), vocabulary(Path(draft_dir))
    if not ours and not theirs:
        return
    if not ours or not theirs:
        missing = target_dir if not ours else draft_dir
        raise GptbcError(f"--draft {draft_dir}: {missing} has no tokenizer files, so the two vocabularies cannot be "
                         f"compared")
    by_id = [{i: t for t, i in v.items()} for v in (ours, theirs)]
    for i in range(max(max(by_id[0], default=-1), max(by_id[1], default=-1)) + 1):
        a, b = by_id[0].get(i), by_id[1].get(i)
        if a != b:
            raise GptbcError(f"--draft {draft_dir}: token {i} is {b!r} there but {a!r} in the target {target_dir} "
                             f"(a draft model must share the target's tokenizer)")


class DraftModel:
    """A draft runner and each drafting request's sequence in it. `max_draft`: most tokens drafted a step."""

    def __init__(self, runner, max_draft: int = 8, min_draft: int = 1):
        """`min_draft`..`max_draft`: the range the scheduler chooses each request's k in (min_draft = max_draft
        fixes k, e.g. to measure acceptance)."""
        if not 1 <= min_draft <= max_draft:
            raise ValueError(f"draft model: need 1 <= min_draft <= max_draft, got {min_draft}, {max_draft}")
        self.runner, self.max_draft, self.min_draft = runner, max_draft, min_draft
        self.seqs: dict[int, int] = {}  # request id → the draft's sequence id
        self.held: dict[int, int] = {}  # request id → tokens of it in the draft's KV cache

    def release(self, req_id: int) -> None:
        """Free a request's draft sequence (it finished, failed or was cancelled)."""
        seq = self.seqs.pop(req_id, None)
        self.held.pop(req_id, None)
        if seq is not None:
            self.runner.remove_sequence(seq)

    def sequence_count(self) -> int:
        return len(self.seqs)

    def propose(self, req_ids: Sequence[int], tokens: Sequence[Sequence[int]], ks: Sequence[int],
                params: Sequence[SamplingParams], rngs: Sequence[np.random.Generator]
                ) -> list[tuple[list[int], list[np.ndarray | None]]]:
        """Per request: `ks[i]` drafted tokens following `tokens[i]` (its prompt + output), and the distribution
        each was drawn from (None for greedy requests: the draft's argmax). One catch-up call, then one
        `decode_batch` call per drafted position after the first, over every request still drafting."""
        rows = self._catch_up(req_ids, tokens)
        drafts: list[list[int]] = [[] for _ in req_ids]
        dists: list[list[np.ndarray | None]] = [[] for _ in req_ids]
        live = list(range(len(req_ids)))
        for position in range(max(ks)):
            for i, row in zip(live, rows):
                token, dist = _draw(row, params[i], rngs[i])
                drafts[i].append(token)
                dists[i].append(dist)
            live = [i for i in live if ks[i] > position + 1]
            if not live:
                break
            # feed the tokens just drafted: the last one of each request is never fed (nothing follows it)
            seqs = [self.seqs[req_ids[i]] for i in live]
            rows = self._decode(seqs, [drafts[i][-1] for i in live])
            for i in live:
                self.held[req_ids[i]] += 1
        return list(zip(drafts, dists))

    def settle(self, req_id: int, draft: Sequence[int], added: Sequence[int]) -> None:
        """After a verify of `draft`: the request's output grew by `added`; drop the drafted tokens the draft fed
        that are not among them (the first rejected one and all after it)."""
        fed = len(draft) - 1  # drafted tokens in the draft's KV cache
        keep = 0
        while keep < fed and keep < len(added) and draft[keep] == added[keep]:
            keep += 1
        if fed - keep > 0:
            self.runner.pop_tokens(self.seqs[req_id], fed - keep)
            self.held[req_id] -= fed - keep

    def _catch_up(self, req_ids: Sequence[int], tokens: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Feed each request's tokens the draft has not seen; the logits after the last of each."""
        runner, missing = self.runner, []
        for rid, toks in zip(req_ids, tokens):
            if rid not in self.seqs:
                self.seqs[rid], self.held[rid] = runner.add_sequence(), 0
            if self.held[rid] >= len(toks):  # it must feed at least the last token to get its logits
                runner.pop_tokens(self.seqs[rid], self.held[rid] - len(toks) + 1)
                self.held[rid] = len(toks) - 1
            missing.append(list(toks[self.held[rid]:]))
            self.held[rid] = len(toks)
        seqs = [self.seqs[r] for r in req_ids]
        if all(len(m) == 1 for m in missing) and len(seqs) <= runner.max_batch_size:
            return self._decode(seqs, [m[0] for m in missing])
        rows: list[np.ndarray | None] = [None] * len(seqs)
        batch, room = [], runner.prefill_chunk_size
        for i, m in enumerate(missing):
            if len(m) <= room and len(batch) < runner.max_batch_size:
                batch.append(i)
                room -= len(m)
                continue
            for start in range(0, len(m), runner.prefill_chunk_size):  # a long catch-up (a prompt) alone
                rows[i] = runner.prefill_chunk(seqs[i], m[start:start + runner.prefill_chunk_size])
        if batch:
            got = runner.prefill_batch([seqs[i] for i in batch], [missing[i] for i in batch])
            for i, row in zip(batch, got):
                rows[i] = row
        return rows


    def _decode(self, seqs: list[int], tokens: list[int]) -> list[np.ndarray]:
        """One token for each sequence; a lone sequence through the single-row kernels where those are faster
        (CPU), as the scheduler decodes one."""
        if len(seqs) == 1 and self.runner.single_row_decode:
            return [self.runner.decode(seqs[0], tokens[0])]
        return list(self.runner.decode_batch(seqs, tokens))


def _draw(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> tuple[int, np.ndarray | None]:
    """A drafted token: the argmax for a greedy request; else drawn from the draft's distribution under the
    request's temperature / top-k / top-p / min-p (that distribution is returned for the accept rule)."""
    if params.greedy:
        return int(np.argmax(logits)), None
    q = probabilities(logits, params)
    return int(rng.choice(q.size, p=q)), q
