"""Loading models from directories: tokenizers only where the directory has one."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ModelError
from engine.models import load, minilm_dir
from tests.conftest import Models


def test_a_directory_without_tokenizer_files_gets_no_tokenizer(models: Models, tmp_path: Path) -> None:
    models("tiny-bert").adapter.model.save_pretrained(tmp_path)
    loaded = load(str(tmp_path))
    assert loaded.adapter.family == "bert"
    assert loaded.tokenizer is None


def test_a_directory_with_tokenizer_files_gets_its_tokenizer(models: Models, tmp_path: Path) -> None:
    models("minilm").adapter.model.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((minilm_dir() / name).read_bytes())
    loaded = load(str(tmp_path))
    assert loaded.tokenizer is not None
    assert loaded.tokenizer("hello world")["input_ids"][1] != loaded.tokenizer.unk_token_id


def test_a_bert_decoder_is_refused(models: Models, tmp_path: Path) -> None:
    model = models("tiny-bert").adapter.model
    model.config.is_decoder = True
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.config.is_decoder = False
    with pytest.raises(ModelError, match="decoder"):
        load(str(tmp_path))


def test_asking_for_cuda_without_a_gpu_says_so(models: Models) -> None:
    import torch

    from engine.models import to_device

    if torch.cuda.is_available():
        assert to_device(models("tiny-bert"), "cuda").adapter.device.type == "cuda"
    else:
        with pytest.raises(ModelError, match="no CUDA device"):
            to_device(models("tiny-bert"), "cuda")
