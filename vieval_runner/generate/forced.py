"""Scripted answers through the real decode path: a logits processor that forces (or, for a
``SoftScript``, boosts) given texts row by row. ``batches.generate(forced_texts=...)`` uses it;
tests, benchmarks and the demo script answers with it, evaluation never does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor


class SoftScript(str):
    """A scripted answer whose tokens are boosted rather than forced (tests of scores).

    ``margins[t]`` (aligned with the text's tokens, then EOS): the scripted token ``t`` gets
    the row's best score plus this margin, so greedy decoding still writes the script but the
    token's probability is below 1 and depends on the margin; ``None`` (or past the list)
    forces it as usual. It is a ``str``, so it travels through ``forced_texts`` unchanged.
    """

    margins: tuple[float | None, ...]

    def __new__(cls, text: str, margins: Sequence[float | None]) -> SoftScript:
        obj = super().__new__(cls, text)
        obj.margins = tuple(margins)
        return obj


class ForcedTextLogitsProcessor(LogitsProcessor):
    """Forces batch row ``i`` to emit the tokens of ``texts[i]`` then EOS (None: leave free).

    Used by tests, benchmarks and the demo to push scripted answers through the real ``generate`` and
    decode path. ``texts`` is aligned with the rows of the batch as passed to ``generate``;
    ``batches.generate(forced_texts=...)`` keeps it aligned across its length sort.
    One instance serves one ``generate`` call (it remembers the prompt length). A
    ``SoftScript`` text is boosted by its margins instead of forced (see there).
    """

    def __init__(self, tokenizer, texts: list[str | None], eos_token_id: int | None = None):
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        self.targets = [
            None if t is None else tokenizer.encode(t, add_special_tokens=False) + [eos]
            for t in texts
        ]
        self.margins = [getattr(t, "margins", ()) for t in texts]
        self.eos = eos
        self.prompt_len: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        t = input_ids.shape[1] - self.prompt_len
        if len(self.targets) != scores.shape[0]:
            raise ValueError(f"{len(self.targets)} forced texts for a batch of {scores.shape[0]}")
        scores = scores.clone()
        for row, target in enumerate(self.targets):
            if target is None:
                continue
            token = target[t] if t < len(target) else self.eos
            margins = self.margins[row]
            margin = margins[t] if t < len(margins) else None
            if margin is not None:
                scores[row, token] = scores[row].max() + float(margin)
                continue
            scores[row] = float("-inf")
            scores[row, token] = 0.0
        return scores
