"""Needle-in-a-haystack prompts and a held-out perplexity passage, from offline text.

Standard library only (the text is ``pydoc_data.topics.topics``, Python's reference
documentation, present in every CPython), so both tcompile (``tcompile.models.needle``: the
smollm2 zoo entry's example prompt) and the kvpress peer venv, which does not install tcompile
(through ``bench/needle.py``, which loads this file by path), share it.  Works with any Hugging Face tokenizer that has
``encode(text, add_special_tokens=False)`` and, for prompts, a chat template.

Text split, so haystacks and perplexity text never overlap:
  * haystacks are drawn from the START of the sorted topic keys (``HAYSTACK_KEYS``, the first
    70 of 79 keys, ~415k characters, ~100k SmolLM2 tokens), concatenated in sorted key order
    and cut at a sentence boundary;
  * ``perplexity_text()`` is made of the LAST five sorted keys (``PERPLEXITY_KEYS``:
    typesseq-mutable, unary, while, with, yield; ~11.7k characters, ~2.6k SmolLM2 tokens).
"""

from __future__ import annotations

import bisect
import re
from functools import lru_cache

from pydoc_data.topics import topics as _TOPICS

_KEYS = sorted(_TOPICS)
HAYSTACK_KEYS: list[str] = _KEYS[:70]
PERPLEXITY_KEYS: list[str] = _KEYS[-5:]

# (depth fraction, magic number): six trials, distinct fixed magic numbers of 5-7 digits.
NEEDLE_CASES: list[tuple[float, int]] = [
    (0.10, 73914),
    (0.26, 582036),
    (0.42, 4619207),
    (0.58, 91357),
    (0.74, 268451),
    (0.90, 3075862),
]

QUESTION = "What is the special magic number mentioned in the text above? Answer with the number only."


def needle_sentence(magic: int) -> str:
    return f"The special magic number is {magic}."


@lru_cache(maxsize=None)
def _source() -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """Haystack source text, the character offsets where sentences start (needle positions),
    and the offsets where the haystack may end (sentence starts and line starts)."""
    text = "\n\n".join(_TOPICS[k].strip() for k in HAYSTACK_KEYS)
    # A sentence starts after '.', '!' or '?' + whitespace + a capital letter, or after a blank
    # line when the next paragraph is not indented (code blocks are indented).
    pat = r"(?<=[.!?])\s+(?=[A-Z])|\n\n+(?=[^\s])"
    starts = tuple(sorted({m.end() for m in re.finditer(pat, text)}))
    ends = tuple(sorted(set(starts) | {m.end() for m in re.finditer(r"\n", text)}))
    return text, starts, ends


def _ntok(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _last_fitting(tokenizer, text: str, bounds, budget: int) -> int:
    """Index into bounds of the largest boundary b with ntok(text[:b]) <= budget (binary search)."""
    lo, hi = 0, len(bounds) - 1
    if _ntok(tokenizer, text[: bounds[0]].rstrip()) > budget:
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _ntok(tokenizer, text[: bounds[mid]].rstrip()) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def haystack_text(tokenizer, context_tokens: int, depth: float, magic: int) -> str:
    """~context_tokens tokens of pydoc text (sorted-key order, from the start of the key list)
    with the needle sentence inserted at the sentence boundary nearest to ``depth`` (fraction of
    the haystack's tokens).  The haystack ends at a line or sentence boundary; the total, needle
    included, is at most context_tokens tokens and within one line of it."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    text, starts, ends = _source()
    needle = needle_sentence(magic)
    budget = context_tokens - _ntok(tokenizer, " " + needle)
    # Rough character cut first (cheap), then exact search over sentence boundaries below it.
    approx = min(len(text), int(budget * 8) + 2000)
    cand = ends[: bisect.bisect_right(ends, approx)]
    if not cand or cand[-1] >= len(text):
        raise ValueError("context_tokens too large for the haystack source")
    end = cand[_last_fitting(tokenizer, text, cand, budget)]
    hay = text[:end].rstrip()
    inner = [b for b in starts if b < len(hay)]
    if not inner:  # no sentence boundary inside: put the needle at the start or the end
        return (needle + " " + hay) if depth < 0.5 else (hay + " " + needle)
    # Sentence boundary whose token prefix is nearest depth * total tokens.
    total = _ntok(tokenizer, hay)
    target = depth * total
    i = _last_fitting(tokenizer, hay, inner, int(target))
    choices = [j for j in (i, i + 1) if j < len(inner)]
    b = min(choices, key=lambda j: abs(_ntok(tokenizer, hay[: inner[j]]) - target))
    pos = inner[b]
    if depth == 0.0:
        pos = 0
    return hay[:pos] + needle + " " + hay[pos:]


def needle_prompt_ids(tokenizer, context_tokens: int, depth: float, magic: int) -> list[int]:
    """Token ids of the chat prompt: one user message (haystack + "\\n\\n" + QUESTION), with the
    generation prompt added.  The template is rendered to a string, then encoded without extra
    special tokens (the same ids under transformers 4.x and 5.x)."""
    content = haystack_text(tokenizer, context_tokens, depth, magic) + "\n\n" + QUESTION
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer.encode(prompt, add_special_tokens=False))


def needle_found(text: str, magic: int) -> bool:
    """True if the magic number appears in text as a whole number (digit groups separated by
    ',' or a space are joined first, so "7,391,4" style splits still count)."""
    joined = re.sub(r"(?<=\d)[,\s](?=\d)", "", text)
    return re.search(rf"(?<!\d){magic}(?!\d)", joined) is not None


def perplexity_text() -> str:
    """Held-out pydoc passage (the last five sorted topic keys; ~2.6k SmolLM2 tokens), disjoint
    from every haystack, which draws from the first 70 keys."""
    return "\n\n".join(_TOPICS[k].strip() for k in PERPLEXITY_KEYS)
