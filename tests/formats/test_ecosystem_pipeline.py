"""A pipeline-produced artifact loads in transformers + optimum + GPTQModel with our logits.

Where test_ecosystem_gptq.py writes artifacts by hand, this one runs `compress.pipeline.run`
end to end (load, quantize, export with tokenizer and configs) on a tiny Llama, then loads
the folder with `AutoModelForCausalLM.from_pretrained` and compares with our own loader.

Runs only where the peer packages are installed (``bash scripts/setup-peers.sh``, then
``GPTQMODEL_CPU_WORKERS=2 .venv-peers/bin/python -m pytest -m ecosystem tests/formats``).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.ecosystem

pytest.importorskip("optimum")
pytest.importorskip("gptqmodel")

from transformers import AutoModelForCausalLM, GPTQConfig  # noqa: E402

from compress.config import parse_config  # noqa: E402
from compress.formats.artifact import open_artifact  # noqa: E402
from compress.formats.writer import is_complete  # noqa: E402
from compress.pipeline import run  # noqa: E402
from tiny_models import make_model, run_config, save_model, walk_logits  # noqa: E402

VOCAB = 512


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    # GPTQ kernels want dims divisible by 128 (and by the group size).
    model = make_model("llama", seed=11, hidden_size=256, intermediate_size=512, num_key_value_heads=4)
    return save_model(model, tmp_path_factory.mktemp("llama256"), tiny_tokenizer)


def our_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    return walk_logits(open_artifact(folder, torch.device("cpu"), torch.float32), ids)


# "torch" dequantizes in fp16 (the scale dtype) and multiplies in float32: it differs from our
# float32 dequantization by fp16 rounding of scale*(q-zero) only (see test_ecosystem_gptq.py).
@pytest.mark.parametrize("method,bits,group_size,desc_act", [
    ("rtn", 4, 128, False), ("rtn", 8, -1, False), ("gptq", 4, 64, True),
])
def test_pipeline_artifact_loads_in_transformers_with_our_logits(
    method, bits, group_size, desc_act, llama_dir, text_file, tmp_path
):
    quantize = {"method": method, "bits": bits, "group_size": group_size}
    if method == "gptq":
        quantize.update(desc_act=desc_act, static_groups=False)  # a really permuted g_idx
    cfg = parse_config(run_config(
        llama_dir, text_file, tmp_path / "out", evaluate={"enabled": False}, quantize=quantize,
        export={"format": "gptq"},
    ))
    ctx = run(cfg)
    (res,) = ctx.candidates.values()
    assert res.error is None and is_complete(res.artifact, check_hashes=True)

    peer = AutoModelForCausalLM.from_pretrained(
        str(res.artifact), dtype=torch.float32, device_map="cpu",
        quantization_config=GPTQConfig(bits=bits, backend="torch"),
    ).eval()
    assert type(peer.model.layers[0].self_attn.q_proj).__module__.startswith("gptqmodel")
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = torch.cat([peer(ids[w : w + 1]).logits for w in range(ids.shape[0])])
        original = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()
        ref = torch.cat([original(ids[w : w + 1]).logits for w in range(ids.shape[0])])
    ours = our_logits(res.artifact, ids)
    scale = ours.abs().max().item()
    # Quantization changes the logits far beyond the tolerance (else agreement proves nothing).
    assert (ours - ref).abs().max().item() > 0.01 * scale
    diff = (theirs - ours).abs().max().item()
    assert diff < 2e-3 * scale, f"max |peer - ours| = {diff:.3g}, logit scale {scale:.3g}"


def test_per_layer_overrides_load_in_gptqmodel(llama_dir, text_file, tmp_path):
    """Bits, group size and symmetry of one layer differ from the plan's: GPTQModel's own loader
    reads them from the `dynamic` map (transformers + optimum ignores `dynamic`, so this is the
    loader that serves such an artifact), with our logits."""
    from gptqmodel import BACKEND, GPTQModel

    cfg = parse_config(run_config(
        llama_dir, text_file, tmp_path / "out", evaluate={"enabled": False}, export={"format": "gptq"},
        quantize={"method": "rtn", "bits": 4, "group_size": 128, "overrides": [
            {"pattern": r"layers\.1\.mlp\.down_proj", "bits": 8, "group_size": -1, "sym": False}]},
    ))
    (res,) = run(cfg).candidates.values()
    # TorchLinear computes in fp16 or bf16 only: fp16 is the closer of the two to our float32.
    peer = GPTQModel.load(str(res.artifact), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    layer = peer.model.model.layers[1].mlp.down_proj
    assert (layer.bits, layer.group_size, layer.sym) == (8, 512, False)  # -1 reads as in_features (512)
    assert peer.model.model.layers[0].mlp.down_proj.bits == 4
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = torch.cat([peer.model(ids[w : w + 1]).logits.float() for w in range(ids.shape[0])])
    ours = our_logits(res.artifact, ids)
    lp, lq = torch.log_softmax(ours.double(), -1), torch.log_softmax(theirs.double(), -1)
    assert float((lp.exp() * (lp - lq)).sum(-1).mean()) < 1e-4
