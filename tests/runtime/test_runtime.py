"""The runtime registry and the torch decoder: an artifact opens on the fast kernels, its logits
follow the dequantize-per-call reference within bfloat16 rounding, greedy decoding agrees, and
what is no artifact is refused with the path."""
from __future__ import annotations

import json

import pytest
import torch

from compress.evaluate.speed import measure
from compress.formats.artifact import open_artifact
from compress.models.checkpoint import CheckpointError
from compress.runtime.kernels import DENSE, INT4, INT8
from compress.runtime.registry import RUNTIMES, kind_of, open_decoder
from compress.runtime.torch_runtime import TorchDecoder

CPU = torch.device("cpu")


def _reference(path) -> TorchDecoder:
    model = open_artifact(path, CPU, torch.float32).materialize_all()  # QuantLinear: dequantize per call
    return TorchDecoder(model, "reference", CPU, {})


@pytest.mark.parametrize("name,kernel", [("w4", INT4), ("w8", INT8)])
def test_fast_path_follows_the_reference(artifacts, name, kernel) -> None:
    fast, ref = open_decoder(artifacts[name], CPU), _reference(artifacts[name])
    assert kind_of(artifacts[name]) == "gptq"
    assert fast.label == f"{kernel} x{len(fast.kernels)}" and len(fast.kernels) == 2 * 7
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    a, b = fast.prefill(ids), ref.prefill(ids)
    spread = float(b.max() - b.min())
    assert float((a - b).abs().max()) < 0.02 * spread
    # Greedy: the reference's token at every step, wherever its lead over the runner-up is more
    # than the two paths can differ by; both decoders are fed the reference's tokens.
    steps = 0
    for _ in range(16):
        top2 = b.topk(2)
        if float(top2.values[0] - top2.values[1]) > 2 * float((a - b).abs().max()) + 1e-6:
            assert int(a.argmax()) == int(top2.indices[0])
            steps += 1
        tok = int(top2.indices[0])
        a, b = fast.step(tok), ref.step(tok)
    assert steps >= 8


def test_measure_names_the_runtime(artifacts, model_dir) -> None:
    res = measure(open_decoder(artifacts["w4"], CPU), prompt=8, new=3, device=CPU, repeats=1)
    assert res["speed_runtime"].startswith(INT4) and res["decode_tokens_per_s"] > 0
    dense = measure(open_decoder(model_dir("llama"), CPU), prompt=8, new=3, device=CPU, repeats=1)
    assert dense["speed_runtime"] == "torch fp32"


def test_what_is_no_artifact_is_refused(tmp_path, artifacts, monkeypatch) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        kind_of(tmp_path / "missing")
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a model folder"):
        kind_of(tmp_path / "f.bin")
    with pytest.raises(CheckpointError, match="no config.json"):
        kind_of(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(CheckpointError, match="bitsandbytes"):
        kind_of(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"")
    assert kind_of(tmp_path) == "onnx"
    open_decoder(artifacts["w4"], CPU)  # the built-in runtimes are registered by now
    monkeypatch.delitem(RUNTIMES, "onnx", raising=False)  # as where no ONNX runtime is installed
    with pytest.raises(CheckpointError, match="no runtime for onnx"):
        open_decoder(tmp_path, CPU)
