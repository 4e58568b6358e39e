"""One way to open any file qbench reads (qbench.safefile).  For each
kind a FIFO, a symlink to /dev/zero and an oversized file (a small cap given as a
parameter) are refused at once with one line, through the reader that kind really uses."""
import json
import os
import shutil
import types

import numpy as np
import pytest
import torch

from qbench import safefile
from qbench.cli import EXIT_CHECKPOINT, EXIT_USAGE, main
from qbench.zoo import CheckpointError


from no_hang import no_hang  # noqa: E402


def plant(path, how, size=64):
    """Replace `path` by a FIFO, a symlink to /dev/zero or a regular file of `size` bytes."""
    if os.path.lexists(path):
        os.unlink(path)
    if how == "fifo":
        os.mkfifo(path)
    elif how == "devzero":
        os.symlink("/dev/zero", path)
    else:
        path.write_bytes(b"x" * size)


HOWS = ["fifo", "devzero", "oversized"]


@pytest.mark.parametrize("kind", sorted(safefile.LIMITS))
@pytest.mark.parametrize("how", HOWS)
def test_every_kind_refuses_what_is_not_a_small_regular_file(tmp_path, kind, how):
    path = tmp_path / "f"
    plant(path, how)
    with no_hang(), pytest.raises(safefile.UnsafeFileError) as err:
        safefile.read_bytes(path, kind, max_bytes=16)
    assert str(err.value).startswith(f"{kind} file {path} is ") and "\n" not in str(err.value)
    assert ("FIFO" if how == "fifo" else "character device" if how == "devzero" else "byte limit") in str(err.value)
    (tmp_path / "ok").write_bytes(b"0123")
    assert safefile.read_bytes(tmp_path / "ok", kind) == b"0123"


@pytest.mark.parametrize("how", HOWS)
def test_the_checkpoint_hash_never_reads_forever(micro_checkpoint, tmp_path, how):
    """zoo.file_hash read pytorch_model.bin -> /dev/zero forever, a FIFO blocked its open."""
    from qbench.zoo import file_hash

    path = tmp_path / "pytorch_model.bin"
    plant(path, how)
    with no_hang(), pytest.raises(CheckpointError, match="weights file .* is "):
        file_hash([micro_checkpoint / "config.json", path], max_bytes=16)


@pytest.mark.parametrize("name,how", [("model.safetensors", "fifo"), ("model.safetensors", "devzero"),
                                      ("config.json", "fifo"), ("config.json", "devzero")])
def test_a_checkpoint_file_that_is_not_regular_is_exit_3(micro_checkpoint, tmp_path, capsys, name, how):
    folder = tmp_path / "ckpt"
    shutil.copytree(micro_checkpoint, folder)
    plant(folder / name, how)
    with no_hang():
        code = main(["bench", "--model", str(folder), "--schemes", "fp32", "--results", str(tmp_path / "r"),
                     "--quiet", "--limit", "2000"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_CHECKPOINT and len(err.splitlines()) == 1 and "not a regular file" in err, err


@pytest.mark.parametrize("how", HOWS)
def test_zoo_yaml_under_qbench_models(tmp_path, monkeypatch, capsys, how):
    from qbench.zoo import _parse_zoo

    monkeypatch.setenv("QBENCH_MODELS", str(tmp_path))
    plant(tmp_path / "zoo.yaml", how, size=100)
    with no_hang(), pytest.raises(CheckpointError, match="zoo file"):
        _parse_zoo(tmp_path / "zoo.yaml", max_bytes=16)
    if how != "oversized":
        with no_hang():
            assert main(["list", "models"]) == EXIT_CHECKPOINT
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("text", ["models: [a, b]\n", "models: {a: 3}\n", "- 1\n", "models: {a: {path: [1]}}\n",
                                  "models: {a: &x {path: p}, b: *x}\n", "models: {\n", "\xff\xfe"])
def test_a_malformed_zoo_yaml_is_one_line_exit_3(tmp_path, monkeypatch, capsys, text):
    monkeypatch.setenv("QBENCH_MODELS", str(tmp_path))
    (tmp_path / "zoo.yaml").write_bytes(text.encode("latin-1"))
    assert main(["list", "models"]) == EXIT_CHECKPOINT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "zoo file" in err, err


@pytest.mark.parametrize("command", ["train", "retrofit"])
@pytest.mark.parametrize("how", ["fifo", "devzero"])
def test_a_recipe_file_that_is_not_regular_is_exit_2(tmp_path, capsys, command, how):
    recipe = tmp_path / "r.yaml"
    plant(recipe, how)
    extra = ["--attention", "vga"] if command == "train" else ["--arm", "vga"]
    with no_hang():
        assert main([command, *extra, "--preset", str(recipe), "--out", str(tmp_path / "o")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "recipe file" in err and "not a regular file" in err, err


def _corpus_and_tokenizer(micro_checkpoint, small_corpus):
    from transformers import AutoTokenizer

    from qbench.data import load_corpus

    return load_corpus(str(small_corpus)), AutoTokenizer.from_pretrained(micro_checkpoint)


@pytest.mark.parametrize("how", ["fifo", "devzero", "truncated", "forged", "folder"])
def test_a_damaged_token_cache_heals(micro_checkpoint, small_corpus, tmp_path, monkeypatch, how):
    """The token cache was read with np.load: a FIFO hung, a truncated file was every
    calibrated cell's stored failure.  Now it is encoded again and replaced once."""
    from qbench.data import tokens

    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "cache"))
    corpus, tokenizer = _corpus_and_tokenizer(micro_checkpoint, small_corpus)
    good = tokens.cached_split_ids(corpus, "validation", tokenizer)
    [path] = (tmp_path / "cache" / "tokens").glob("*.npy")
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-7])
    elif how == "forged":  # a header declaring 10^13 elements over a few bytes of data
        header = {"descr": "<i4", "fortran_order": False, "shape": (10 ** 13,)}
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(b"\0" * 16)
    elif how == "folder":
        path.unlink()
        path.mkdir()
    else:
        plant(path, how)
    with no_hang():
        again = tokens.cached_split_ids(corpus, "validation", tokenizer)
    assert np.array_equal(again, good)
    if how != "folder":  # healed: the entry is a regular file holding the ids again
        assert path.is_file() and not path.is_symlink() and np.array_equal(np.load(path), good)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 7)

    def forward(self, input_ids):
        return types.SimpleNamespace(logits=self.emb(input_ids))


@pytest.mark.parametrize("target", ["ids", "values"])
@pytest.mark.parametrize("how", ["fifo", "devzero", "forged", "truncated"])
def test_a_damaged_fp_logit_cache_is_recomputed(tmp_path, monkeypatch, target, how):
    from qbench.eval.reference import FPReference

    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path))
    reference = FPReference(_Tiny(), "h")
    x = torch.randint(0, 11, (2, 5))
    first = reference.log_probs("k", 0, x)
    [path] = [p for p in (tmp_path / "fp_logits").rglob("*.npy") if p.name.endswith(".ids.npy") == (target == "ids")]
    if how == "forged":
        header = {"descr": "<f4" if target == "values" else "<i8", "fortran_order": False,
                  "shape": (2, 4, 10 ** 13) if target == "values" else (10 ** 13,)}
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(b"\0" * 8)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:-3])
    else:
        plant(path, how)
    with no_hang():
        again = reference.log_probs("k", 0, x)
    assert torch.equal(again, first) and reference.computed_batches == 2
    assert path.is_file() and not path.is_symlink()  # replaced by a good entry
    assert torch.equal(reference.log_probs("k", 0, x), first) and reference.computed_batches == 2  # read back


def test_load_npy_checks_the_header_before_allocating(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.arange(6, dtype=np.int32).reshape(2, 3))
    assert np.array_equal(safefile.load_npy(path, shape=(2, 3), dtype=np.int32), np.arange(6).reshape(2, 3))
    with pytest.raises(ValueError, match="shape"):
        safefile.load_npy(path, shape=(3, 2))
    with pytest.raises(ValueError, match="dtype"):
        safefile.load_npy(path, dtype=np.float32)
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="no pickle"):
        safefile.load_npy(path)


def _retrofit_folder(tmp_path, facts=None, text=None):
    folder = tmp_path / "rf"
    folder.mkdir(exist_ok=True)
    (folder / "deltas.safetensors").write_bytes(b"")
    good = {"base": "b", "base_checkpoint_hash": "0" * 16, "arm": "vga", "seed": 0, "recipe": {"name": "r"},
            "trainable": []}
    (folder / "retrofit.json").write_text(text if text is not None else json.dumps({**good, **(facts or {})}))
    return folder


@pytest.mark.parametrize("facts,needle", [
    ({"recipe": "x"}, "`recipe` is a str"), ({"base": 3}, "`base` is a int"), ({"trainable": "arm"}, "`trainable`"),
    ({"trainable": [1]}, "`trainable` must list"), ({"seed": True}, "`seed` is a bool"),
    ({"recipe": {"name": [1]}}, "recipe.name"),
])
def test_retrofit_json_of_the_wrong_types_is_exit_3(tmp_path, capsys, facts, needle):
    folder = _retrofit_folder(tmp_path, facts)
    assert main(["bench", "--model", str(folder), "--schemes", "fp32", "--results", str(tmp_path / "r")]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.parametrize("how", ["deep", "fifo", "devzero", "oversized"])
def test_retrofit_json_deep_or_not_regular_or_oversized(tmp_path, capsys, how):
    from qbench.retrofit.deltas import read_retrofit_config

    folder = _retrofit_folder(tmp_path, text="[" * 100_000 + "]" * 100_000 if how == "deep" else None)
    if how in ("fifo", "devzero"):
        plant(folder / "retrofit.json", how)
    with no_hang(), pytest.raises(CheckpointError) as err:
        read_retrofit_config(folder, max_bytes=16 if how == "oversized" else None)
    assert "\n" not in str(err.value) and ("nested" if how == "deep" else "retrofit file") in str(err.value)
