"""What crosses the group: compact token ids, raw uint8 images, segment rows in fp16/bf16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from engine.adapters import Task, Tensors
from engine.errors import BadRequest
from engine.fidelity import planned_bytes
from engine.models import load_dir
from engine.program import plan_job, spec_from_dict, spec_to_dict, split_inputs
from engine.segments import Compression, Method
from engine.sim import run_local, run_simulated
from engine.vit import ViTAdapter
from engine.wire import compact_tokens, id_dtype, widen_tokens
from tests.conftest import Models, inputs_for, max_diff, token_inputs
from transport.localcluster import LocalCluster


def raw_image(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=gen, dtype=torch.uint8)


def as_daemon_does(raw: torch.Tensor) -> torch.Tensor:
    """agent/jobs/inputs.py's float image: ViT's default normalisation."""
    return (raw.float() / 255.0 - 0.5) / 0.5


def same(a: Tensors, b: Tensors) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- token ids ----------------------------------------------------------------------------------
def test_token_ids_travel_in_the_narrowest_dtype_and_come_back_as_int64() -> None:
    assert id_dtype(30522) is torch.int16  # BERT
    assert id_dtype(50257) is torch.int32  # GPT-2
    inputs = token_inputs(3, 9, vocab=30522, pad_rows={1: 4})
    inputs["token_type_ids"] = torch.ones_like(inputs["input_ids"])
    wire = compact_tokens(inputs, 30522)
    assert [wire[k].dtype for k in ("input_ids", "attention_mask", "token_type_ids")] == [
        torch.int16,
        torch.uint8,
        torch.uint8,
    ]
    back = widen_tokens(wire)
    assert all(back[k].dtype is torch.long and torch.equal(back[k], inputs[k]) for k in inputs)
    # An id the wire dtype cannot hold travels as it came (the embedding reports it, not the wire).
    odd = {"input_ids": torch.tensor([[5, 40000]])}
    assert compact_tokens(odd, 30522)["input_ids"].dtype is torch.long


@pytest.mark.gloo
@pytest.mark.parametrize(
    ("name", "task", "key"), [("tiny-bert", Task.EMBED, "embedding"), ("tiny-gpt2", Task.LOGLIK, "loglik")]
)
def test_gloo_ranks_get_compact_ids_and_compute_the_same(
    cluster: LocalCluster, models: Models, name: str, task: Task, key: str
) -> None:
    model = models(name)
    inputs = inputs_for(model.adapter.family)
    spec = plan_job(model.adapter, name, task, inputs, ranks=2, comp=Compression(cr=None))
    got = cluster.run(model, spec, inputs)
    ref = run_local(model.adapter, task, inputs).outputs
    assert max_diff(got.outputs[key], ref[key]) <= 1e-4
    as_int64 = sum(t.numel() * 8 for t in inputs.values())
    wire = sum(t.numel() * t.element_size() for t in split_inputs(model.adapter, spec, inputs)[0].values())
    assert wire * 16 <= as_int64 * 3  # ids int16 (vocab 1000), mask uint8: 3/16 of int64
    assert got.traces[1].io_bytes_recv < wire + 400  # plus the JSON header


# -- images -------------------------------------------------------------------------------------
@pytest.mark.parametrize("comp", [Compression(cr=None), Compression(cr=4), Compression(cr=8, method=Method.CODES)])
def test_raw_uint8_pixels_give_the_float_images_numbers_bit_for_bit(models: Models, comp: Compression) -> None:
    adapter = models("tiny-vit").adapter
    raw = raw_image(3)
    spec = plan_job(adapter, "tiny-vit", Task.CLASSIFY, {"pixel_values": raw}, ranks=3, comp=comp, gather_hidden=True)
    from_raw = run_simulated(adapter, spec, {"pixel_values": raw}).outputs
    from_float = run_simulated(adapter, spec, {"pixel_values": as_daemon_does(raw)}).outputs
    assert same(from_raw, from_float)
    local_raw = run_local(adapter, Task.CLASSIFY, {"pixel_values": raw}).outputs
    assert same(local_raw, run_local(adapter, Task.CLASSIFY, {"pixel_values": as_daemon_does(raw)}).outputs)
    if comp.cr is None:
        assert max_diff(from_raw["logits"], local_raw["logits"]) <= 1e-4


def test_a_rank_gets_a_quarter_of_the_bytes_for_its_patches(models: Models) -> None:
    adapter = models("tiny-vit").adapter
    raw = raw_image(2)
    spec = plan_job(adapter, "tiny-vit", Task.CLASSIFY, {"pixel_values": raw}, ranks=2, comp=Compression(cr=4))
    _, local_raw = split_inputs(adapter, spec, {"pixel_values": raw})
    _, local_float = split_inputs(adapter, spec, {"pixel_values": as_daemon_does(raw)})
    assert local_raw[1]["patches"].dtype is torch.uint8
    raw_bytes, float_bytes = (
        t[1]["patches"].numel() * t[1]["patches"].element_size() for t in (local_raw, local_float)
    )
    assert raw_bytes == 2 * 32 * 3 * 4 * 4  # rank 1's 32 patches of 3 x 4 x 4 pixels, per sample
    assert float_bytes == 4 * raw_bytes
    codes = Compression(cr=8, method=Method.CODES)
    coded = plan_job(adapter, "tiny-vit", Task.CLASSIFY, {"pixel_values": raw}, ranks=2, comp=codes)
    shared, _ = split_inputs(adapter, coded, {"pixel_values": raw})
    assert shared["pixel_values"].dtype is torch.uint8  # codes: the whole image, still raw


def test_other_pixel_dtypes_are_a_bad_request(models: Models) -> None:
    adapter = models("tiny-vit").adapter
    with pytest.raises(BadRequest, match="uint8"):
        plan_job(
            adapter,
            "tiny-vit",
            Task.CLASSIFY,
            {"pixel_values": torch.zeros(1, 3, 32, 32, dtype=torch.int32)},
            ranks=2,
            comp=Compression(),
        )


def test_a_model_directorys_image_mean_and_std_normalise_raw_pixels(models: Models, tmp_path: Path) -> None:
    model = models("tiny-vit").adapter.model
    model.save_pretrained(tmp_path)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet's, as DeiT ships them
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    adapter = load_dir(str(tmp_path)).adapter
    assert isinstance(adapter, ViTAdapter)
    raw = raw_image(2)
    want = (raw.float() / 255.0 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.equal(adapter.normalise(raw), want)
    spec = plan_job(adapter, "d", Task.CLASSIFY, {"pixel_values": raw}, ranks=2, comp=Compression(cr=4))
    assert same(
        run_simulated(adapter, spec, {"pixel_values": raw}).outputs,
        run_simulated(adapter, spec, {"pixel_values": want}).outputs,
    )
    plain = ViTAdapter(models("tiny-vit").adapter.model)
    assert torch.equal(plain.normalise(raw), as_daemon_does(raw))


# -- segment rows on the wire -------------------------------------------------------------------
@pytest.mark.parametrize("wire", ["fp16", "bf16"])
@pytest.mark.parametrize(
    ("name", "task", "key"), [("tiny-vit", Task.CLASSIFY, "logits"), ("tiny-bert", Task.EMBED, "embedding")]
)
def test_half_precision_rows_halve_the_bytes_and_stay_close(
    models: Models, wire: str, name: str, task: Task, key: str
) -> None:
    adapter = models(name).adapter
    inputs = inputs_for(adapter.family)
    for cr in (None, 4.0):
        plain = plan_job(adapter, name, task, inputs, ranks=3, comp=Compression(cr=cr))
        half = plan_job(adapter, name, task, inputs, ranks=3, comp=Compression(cr=cr, wire_dtype=wire))
        a, b = run_simulated(adapter, plain, inputs), run_simulated(adapter, half, inputs)
        assert b.exchange_bytes * 2 == a.exchange_bytes
        assert planned_bytes(adapter, half, inputs) == b.exchange_bytes
        assert b.outputs[key].dtype is torch.float32  # computed in the model's dtype
        assert float(F.cosine_similarity(a.outputs[key], b.outputs[key], dim=-1).min()) >= 0.999
        assert not torch.equal(a.outputs[key], b.outputs[key])  # the rows were rounded


@pytest.mark.gloo
def test_gloo_carries_half_precision_rows_like_the_in_process_runner(cluster: LocalCluster, models: Models) -> None:
    model = models("tiny-bert")
    inputs = inputs_for("bert")
    spec = plan_job(
        model.adapter, "tiny-bert", Task.CLASSIFY, inputs, ranks=2, comp=Compression(cr=4, wire_dtype="bf16")
    )
    sim, real = run_simulated(model.adapter, spec, inputs), cluster.run(model, spec, inputs)
    assert max_diff(real.outputs["logits"], sim.outputs["logits"]) <= 1e-5
    assert [t.exchange_bytes_sent for t in real.traces] == [t.exchange_bytes_sent for t in sim.traces]


def test_wire_dtype_is_checked_and_travels_in_the_spec(models: Models) -> None:
    with pytest.raises(BadRequest, match="unknown wire dtype"):
        Compression(cr=4, wire_dtype="fp8")
    with pytest.raises(BadRequest, match="does not apply to method 'codes'"):
        Compression(cr=4, method=Method.CODES, wire_dtype="fp16")
    assert Compression(cr=4, wire_dtype="fp16").label() == "cr=4 fp16"
    adapter = models("tiny-bert").adapter
    inputs = inputs_for("bert", batch=4)
    spec = plan_job(
        adapter, "tiny-bert", Task.EMBED, inputs, ranks=2, comp=Compression(cr=4, wire_dtype="bf16"), chunks=2
    )
    data = json.loads(json.dumps(spec_to_dict(spec)))
    assert (data["wire_dtype"], data["overlap"], data["chunks"]) == ("bf16", True, 2)
    assert spec_from_dict(data) == spec
    old = {k: v for k, v in data.items() if k not in ("wire_dtype", "overlap", "chunks")}
    before = spec_from_dict(old)  # a spec from an agent that predates them
    assert (before.comp.wire_dtype, before.overlap, before.chunks) == (None, False, 1)
    with pytest.raises(BadRequest, match="chunks"):
        spec_from_dict({**data, "chunks": 5})


# -- the commands -------------------------------------------------------------------------------
@pytest.mark.gloo
def test_bench_engine_says_how_it_ran_and_counts_half_the_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli.main import main

    argv = ["bench", "engine", "--model", "tiny-vit", "--ranks", "2", "--cr", "8", "--batch", "2", "--repeat", "1"]
    assert main([*argv, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*argv, "--json", "--wire-dtype", "fp16", "--no-overlap"]) == 0
    half = json.loads(capsys.readouterr().out)
    assert (plain["overlap"], plain["chunks"], plain["wire_dtype"]) == (True, 2, "model")
    assert (half["overlap"], half["chunks"], half["wire_dtype"]) == (False, 1, "fp16")
    assert half["bytes_prism"] * 2 == plain["bytes_prism"]
    assert half["prism_breakdown"]["overlap_ms"] == 0.0
    assert plain["prism_breakdown"]["overlap_ms"] > 0.0
