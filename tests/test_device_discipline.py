"""Device discipline without a GPU: training, the mechanism probes and every quantizer of
our own backends run with the model on a CUDA device simulated on the CPU
(tests/device_sim.py), where a tensor made on the CPU meeting the model's tensors fails as
it does on a GPU.  The two bugs a lent H200 found (GPTQ's Hessian on the CPU, the
mechanism log's CPU token sample) are each caught here when reintroduced."""
from dataclasses import replace

import pytest
import torch

from device_sim import DeviceMismatch, SimulatedCuda
from qbench.runner import run_bench
from qbench.quant import SCHEMES
from qbench.results import ResultStore

# bitsandbytes and quanto run their own CUDA kernels, which a CPU cannot stand in for; the
# H200 check ran them (README, GPU section).  Every other backend is plain torch.
OWN_BACKENDS = ("reference", "simulated", "static", "weight_only")
LIMIT = 3000
# the probes (outliers, sinks, drains, gates) on the float model, the 8-bit attention
# kernel, static quantizers and a calibrated weight method
PROBED = ("fp32", "w8a8-attn", "w8a8-pt", "w4-gptq-g64")


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "simulated cuda")
    # torch's own accelerator queries (Adam's graph-capture check calls current_stream()) would
    # initialise a real CUDA runtime on a CUDA build of torch (PyPI's, on Pythons without the
    # CPU wheel): answer them as a CPU build does, no accelerator
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)
    with SimulatedCuda() as sim:
        yield sim


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory, small_corpus, micro_preset):
    """The micro recipe at width 128, so that every group size of the catalogue divides it."""
    from qbench.train import train

    out = tmp_path_factory.mktemp("ckpt") / "micro-vga-128"
    train("vga", replace(micro_preset, d_model=128, d_ff=256, steps=10), seed=0, out=out,
          corpus=str(small_corpus), progress=False)
    return out


def _bb_model(vocab_size: int = 70):
    from qbench.modeling import QBenchConfig, QBenchForCausalLM

    torch.manual_seed(0)
    config = QBenchConfig(vocab_size=vocab_size, n_layer=1, n_head=1, d_model=64, d_ff=128,
                          max_position_embeddings=32, attention="vga")
    return QBenchForCausalLM(config)


def test_the_simulator_catches_a_cpu_tensor_meeting_a_cuda_model(fake_cuda):
    model = _bb_model().to("cuda")
    assert next(model.parameters()).device == torch.device("cuda", 0)
    tokens = torch.randint(3, 70, (2, 16))  # made on the CPU, as the old mechanism log's sample
    with pytest.raises(DeviceMismatch, match="same device"):
        model(tokens)
    assert model(tokens.to("cuda")).logits.device.type == "cuda"
    hessian = torch.zeros(64, 64, dtype=torch.float64)  # the old GPTQ accumulator: CPU
    with pytest.raises(DeviceMismatch):
        torch.linalg.cholesky(hessian + torch.eye(64, dtype=torch.float64, device="cuda"))
    assert fake_cuda.checked > 0


def test_mechanism_probes_take_the_models_device(fake_cuda):
    from qbench.data.bigram_backcopy import BigramBackcopy
    from qbench.probes.mechanism import bb_mechanism, residual_peaks

    task = BigramBackcopy("the quick brown fox jumps over the lazy dog " * 20)
    model = _bb_model(len(task.tokenizer)).to("cuda")
    tokens = task.sample(4, 16, torch.Generator().manual_seed(0))  # a fixed CPU sample
    m = bb_mechanism(model, tokens, task.is_trigger)
    assert 0.0 <= m["attn_s"] <= 1.0 and len(residual_peaks(model, tokens)) == 1


def test_bb_training_with_mechanism_log_runs_on_simulated_cuda(fake_cuda, tmp_path, small_corpus):
    from qbench.train import PRESETS, train

    preset = replace(PRESETS["bb-guo"], d_model=64, d_ff=128, batch_size=4, context=16, steps=4,
                     eval_every=2, save_every=2)
    info = train("vga", preset, seed=0, out=tmp_path / "bb", corpus=str(small_corpus), device="cuda",
                 progress=False)
    assert info["device"] == "simulated cuda" and info["steps"] == 4
    rows = (tmp_path / "bb" / "mechanism_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "4"]


def test_unsupported_device_or_missing_package_is_refused_before_work(monkeypatch):
    """Each handler declares its devices and package where it is registered; a scheme whose
    transform, backend or add-on cannot run on the device, or lacks its package, is refused."""
    import dataclasses

    from qbench.quant.handlers import REGISTRY, check_devices, get_handler
    from qbench.quant.scheme import get_scheme
    from qbench.validate import UsageError

    check_devices([get_scheme("w8a8-dyn"), get_scheme("w4-gptq-g64"), get_scheme("w8a8-sq"),
                   get_scheme("kv4")], torch.device("cuda"))
    check_devices([get_scheme(n) for n in SCHEMES], torch.device("cpu"))  # every scheme runs on the CPU
    simulated = get_handler("backend", "simulated")
    monkeypatch.setitem(REGISTRY["backend"], "simulated", dataclasses.replace(simulated, devices=("cpu",)))
    with pytest.raises(UsageError, match="w8a8-dyn .simulated runs on cpu"):
        check_devices([get_scheme("w8a8-dyn")], torch.device("cuda"))
    kv = get_handler("addon", "kv_cache")
    monkeypatch.setitem(REGISTRY["addon"], "kv_cache", dataclasses.replace(kv, devices=("cpu",)))
    with pytest.raises(UsageError, match="kv4 .kv_cache runs on cpu"):
        check_devices([get_scheme("kv4")], torch.device("cuda"))
    bnb = get_handler("backend", "bitsandbytes")
    monkeypatch.setitem(REGISTRY["backend"], "bitsandbytes", dataclasses.replace(bnb, package="no_such_package_qbench"))
    with pytest.raises(UsageError, match="nf4 .needs the no_such_package_qbench package"):
        check_devices([get_scheme("nf4")], torch.device("cuda"))
    weight_only = get_handler("backend", "weight_only")
    assert weight_only.needs(get_scheme("w4-hqq-g64")) == "hqq" and weight_only.needs(get_scheme("w4-gptq-g64")) is None


@pytest.mark.parametrize("scheme", [n for n, s in SCHEMES.items() if s.backend in OWN_BACKENDS])
def test_every_own_scheme_quantizes_and_evaluates_on_simulated_cuda(scheme, wide_checkpoint, tmp_path, fake_cuda):
    """Calibration (GPTQ, AWQ, SmoothQuant, static ranges), the quantizers, the low-bit
    attention kernel, the FP reference and the probes, all with the model on cuda."""
    tasks = ["ppl", "probes"] if scheme in PROBED else ["ppl"]
    spec = SCHEMES[scheme].kv_cache()
    if spec is not None and spec.residual + spec.sink >= 64:  # the exact window covers this model's short window
        with pytest.raises(ValueError, match="reads a quantized key or value"):  # refused at planning (issue 34)
            run_bench([str(wide_checkpoint)], [scheme], tasks, ResultStore(tmp_path), limit=LIMIT, progress=False,
                      device=torch.device("cuda"))
        return
    records = run_bench([str(wide_checkpoint)], [scheme], tasks, ResultStore(tmp_path),
                        limit=LIMIT, progress=False, device=torch.device("cuda"))
    assert [r["task"] for r in records] == tasks
    for record in records:
        assert record["status"] == "ok", record.get("error")
        assert record["provenance"]["device"].startswith("cuda")
    assert fake_cuda.checked > 0


def test_a_bb_gpu_preset_trains_under_bf16_autocast_on_the_cpu(tmp_path, small_corpus):
    """The campaign's GPU precision path (bf16 autocast, float32 master weights, bf16
    storage) on the CPU: the loss falls, and card and config record the precision."""
    import csv
    import json

    from qbench.train import PRESETS, train

    preset = replace(PRESETS["bb-guo"], d_model=64, d_ff=128, batch_size=16, context=32, steps=30,
                     eval_every=30, save_every=30, lr=3e-3)
    out = tmp_path / "bb-bf16"
    info = train("vga", preset, seed=0, out=out, corpus=str(small_corpus), progress=False, amp="bf16",
                 save_dtype="bfloat16")
    losses = [float(r["train_loss"]) for r in csv.DictReader(open(out / "train_log.csv"))]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # lr 3e-3: the bigram statistics are learnt
    assert info["amp"] == "bf16" and "autocast: bf16" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["qbench_training"]["amp"] == "bf16"


def test_inverse_cdf_sampler_draws_the_same_law(small_corpus):
    """The GPU presets' sampler: back-copy exact, and each transition frequency within 5
    standard errors (sqrt(p(1-p)/n)) of the bigram table, like the multinomial sampler."""
    from qbench.data import load_corpus
    from qbench.data.bigram_backcopy import BigramBackcopy

    task = BigramBackcopy("".join(load_corpus(str(small_corpus)).train))
    x = task.sample_inverse_cdf(2048, 48, torch.Generator().manual_seed(0))
    prev, nxt, before = x[:, 2:-1].flatten(), x[:, 3:].flatten(), x[:, 1:-2].flatten()
    trig = task.is_trigger(prev)
    assert torch.equal(nxt[trig], before[trig])
    common = torch.bincount(prev[~trig]).argmax()
    rows = nxt[(prev == common) & ~trig]
    freq = torch.bincount(rows, minlength=task.vocab_size).double() / len(rows)
    p = task.bigram[common]
    se = (p * (1 - p) / len(rows)).sqrt()
    assert len(rows) > 5000 and ((freq - p).abs() <= 5 * se + 1e-12).all()
    assert (task.first[x[:, 1]] > 0).all() and (x[:, 0] == 1).all()
