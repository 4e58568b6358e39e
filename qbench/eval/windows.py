"""The evaluation windows of the text perplexity protocols, from a token stream.

Every window is a 1-D tensor `x` whose targets are `x[1:]`; `score_from[i]` says which
targets of window i are scored (target index >= score_from[i], i.e. the token at x position
score_from[i] + 1 onward).  `shifted`: the model reads `x[:-1]` (every logit is used; the
last target is not an input); otherwise the model reads `x` and its last logit is unused.

- nonoverlap (qbench's default): window k = [BOS] + S[k*stride : k*stride + W - 1], the
  stride defaulting to W - 1 (windows tile the stream; the last one is shorter), scoring
  from `score_from` (default 0: every target).  A stride below W - 1 - score_from would
  score a token twice and is refused.
- llamacpp (llama.cpp's `perplexity`): the stream with BOS first, [BOS] + S, cut into
  full chunks of W tokens (the remainder is dropped); each chunk's first token is replaced
  by BOS and only the targets of its second half are scored (the logits from position W/2:
  W - 1 - W/2 tokens per chunk).  Equivalently window k = [BOS] + S[k*W : k*W + W - 1].
- rolling (lm-eval's `loglikelihood_rolling`, as its wikitext task): each document alone;
  the first window reads [BOS] + d[:W-1] and scores d[:W]; each next window reads the W
  tokens before its end and scores the W tokens after those already scored (the last one
  fewer), so every token is scored once with as much context as fits.
"""
from __future__ import annotations

import torch


def tiled_windows(stream: torch.Tensor, bos: int | None, window: int, stride: int | None,
                  score_from: int, full_only: bool = False) -> tuple[list[torch.Tensor], list[int]]:
    """nonoverlap and llamacpp: [BOS] + W - 1 stream tokens every `stride` tokens."""
    body = window - 1 if bos is not None else window
    stride = body if stride is None else stride
    windows, scored = [], []
    for start in range(0, len(stream), stride):
        chunk = stream[start: start + body]
        if full_only and len(chunk) < body:
            break
        x = torch.cat([torch.tensor([bos]), chunk]) if bos is not None else chunk
        if len(x) - 1 > score_from:  # at least one scored target
            windows.append(x)
            scored.append(score_from)
    return windows, scored


def rolling_windows(documents: list[torch.Tensor], prefix: int, window: int) -> tuple[list[torch.Tensor], list[int]]:
    """lm-eval's rolling windows (context_len 1) of each document; `x` holds the inputs and
    the last target (the model reads x[:-1], at most `window` tokens)."""
    windows, scored = [], []
    for doc in documents:
        if len(doc) == 0:
            continue
        first = min(window, len(doc))
        windows.append(torch.cat([torch.tensor([prefix]), doc[:first]]))
        scored.append(0)
        done = first
        while done < len(doc):
            predict = min(len(doc) - done, window)
            end = done + predict
            windows.append(doc[end - window - 1: end])  # window inputs + the last target
            scored.append(window - predict)
            done = end
    return windows, scored
