"""Perplexity protocols as options: llama.cpp's (context 512, second half scored) and
lm-eval's rolling windows checked against their definitions on a synthetic token stream;
the default protocol's key is unchanged; bad settings are refused with one line."""
import pytest
import torch
import torch.nn.functional as F

import qbench.eval.perplexity as perplexity
from qbench.data.corpus import Corpus
from qbench.eval.perplexity import PerplexityProtocol, evaluate_perplexity, protocol_windows

BOS, VOCAB = 1, 40


class WordTokenizer:
    """'t17' -> 17: a text of numbered words is a token stream we choose."""
    bos_token_id, eos_token_id, unk_token_id, unk_token = BOS, 2, None, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def convert_ids_to_tokens(self, token_id):
        return f"t{token_id}"


def synthetic_corpus(monkeypatch, documents):
    corpus = Corpus("synthetic", ["t3 t4"], ["t3 t4"], [" ".join(f"t{i}" for i in d) for d in documents])
    monkeypatch.setattr(perplexity, "load_corpus", lambda name: corpus)
    perplexity._WINDOWS.clear()


def stream(n, seed=0):
    return (torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))).tolist()


def tiny_llama(positions):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=positions)).eval()


def test_llamacpp_512_windows_and_scored_tokens_follow_llama_cpp(monkeypatch):
    """llama.cpp's perplexity: tokens = [BOS] + text; n_chunk = len // 512 (the rest dropped);
    chunk k = tokens[512k : 512k + 512] with its first token set to BOS; the logits at
    positions 256..510 score tokens 257..511 (255 per chunk)."""
    text = stream(3 * 512 + 100)  # three full chunks and a remainder llama.cpp drops
    synthetic_corpus(monkeypatch, [text])
    protocol = PerplexityProtocol(kind="llamacpp", corpus="synthetic", window=512)
    assert protocol.id == "llamacpp-c512-bos-synthetic-test" and protocol.scored_targets == 255
    tokens = [BOS] + text
    chunks = [[BOS] + tokens[512 * k + 1: 512 * k + 512] for k in range(len(tokens) // 512)]
    windows, stats, _ = protocol_windows(protocol, WordTokenizer())
    assert [w.tolist() for w in windows] == chunks and len(chunks) == 3
    assert stats["score_from"] == [256] * 3 and not stats["shifted"]

    model = tiny_llama(512)
    expected = 0.0
    with torch.no_grad():
        for chunk in chunks:
            logits = model(input_ids=torch.tensor([chunk])).logits[0]
            expected += F.cross_entropy(logits[256:511], torch.tensor(chunk[257:512]), reduction="sum").item()
    result = evaluate_perplexity(model, WordTokenizer(), protocol)
    assert result["tokens"] == 3 * 255 and result["windows"] == 3
    assert result["nll_sum"] == pytest.approx(expected, rel=1e-5)  # fp32 sums of ~800 terms


def test_lm_eval_rolling_windows_score_every_token_once_per_document(monkeypatch):
    """lm-eval's get_rolling_token_windows(context_len=1): first window [BOS] + d[:W-1] scores
    d[:W]; the next reads the W tokens before its end and scores the new ones."""
    documents = [stream(23, 1), stream(5, 2)]
    synthetic_corpus(monkeypatch, documents)
    protocol = PerplexityProtocol(kind="rolling", corpus="synthetic", window=8)
    windows, stats, _ = protocol_windows(protocol, WordTokenizer())
    d = documents[0]
    inputs = [w.tolist()[:-1] for w in windows]
    assert inputs[:3] == [[BOS] + d[:7], d[7:15], d[14:22]]
    scored = [w.tolist()[1 + s:] for w, s in zip(windows, stats["score_from"])]
    assert scored == [d[:8], d[8:16], d[16:23], documents[1]]  # each token exactly once
    model = tiny_llama(8)
    result = evaluate_perplexity(model, WordTokenizer(), protocol, reference=model)
    assert result["tokens"] == 28 and result["kl"] == pytest.approx(0.0, abs=1e-6)


def test_default_protocol_keeps_its_key_and_options_name_themselves():
    default = PerplexityProtocol(window=256, max_chars=20000)
    assert default.id == "nonoverlap-w256-bos-sotu-test-first20000c"
    assert set(default.to_dict()) == {"kind", "corpus", "split", "window", "max_chars", "sequences", "seed",
                                      "batch_size", "id"}
    assert PerplexityProtocol(window=64, stride=40, score_from=30).id == "nonoverlap-w64-stride40-from30-bos-sotu-test"


@pytest.mark.parametrize("settings, message", [
    ({"window": 64, "stride": 10}, "score tokens twice"),
    ({"window": 64, "score_from": 63}, "first scored target"),
    ({"kind": "llamacpp", "window": 511}, "must be even"),
    ({"kind": "rolling", "window": 64, "stride": 64}, "settings of the nonoverlap protocol"),
])
def test_bad_protocol_settings_are_refused_with_one_line(settings, message):
    with pytest.raises(ValueError, match=message):
        PerplexityProtocol(**settings)


def test_named_protocols_resolve_and_a_window_past_the_context_is_refused_at_planning():
    from types import SimpleNamespace

    from qbench.eval.protocols import ProtocolOptions, resolve_protocol

    ref = SimpleNamespace(name="m", info={}, max_positions=1024)
    assert resolve_protocol(ref, None, options=ProtocolOptions("llamacpp-512")).id == "llamacpp-c512-bos-sotu-test"
    assert resolve_protocol(ref, None, options=ProtocolOptions("lm-eval-rolling")).window == 1024
    assert resolve_protocol(ref, None).id == "nonoverlap-w256-bos-sotu-test"
    with pytest.raises(ValueError, match="unknown protocol 'llama'"):
        resolve_protocol(ref, None, options=ProtocolOptions("llama"))
    short = SimpleNamespace(name="short", info={}, max_positions=256)
    with pytest.raises(ValueError, match="longer than the 256 positions of model short"):
        resolve_protocol(short, None, options=ProtocolOptions("llamacpp-512"))


def test_bench_runs_a_folder_under_llamacpp_512(tmp_path, small_corpus):
    """`qbench bench --model FOLDER --protocol llamacpp-512`: one record, keyed by the protocol,
    every chunk scored on 255 tokens."""
    import json

    from qbench.cli import main
    from qbench.paths import models_dir
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(models_dir() / "tiny-softmax")
    folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=512)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    args = ["bench", "--model", str(folder), "--schemes", "fp32", "--corpus", str(small_corpus), "--quiet",
            "--results", str(tmp_path / "results")]
    assert main(args + ["--protocol", "llamacpp-512"]) == 0
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "results" / "records").glob("*.json")]
    assert record["protocol"].startswith("llamacpp-c512-bos-") and record["status"] == "ok"
    assert record["metrics"]["tokens"] == 255 * record["metrics"]["windows"] > 0
