"""Our AWQ GEMM artifacts load in transformers with GPTQModel's AWQ kernels, with our logits.

The pipeline runs the awq method (and an RTN plan) into `export.format: awq`; the folder is
loaded with `AutoModelForCausalLM.from_pretrained` and compared with our own loader, and
GPTQModel's own AWQ packer/unpacker is checked against our layout.

Runs only where the peer packages are installed (``bash scripts/setup-peers.sh``, then
``GPTQMODEL_CPU_WORKERS=2 .venv-peers/bin/python -m pytest -m ecosystem tests/formats``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.ecosystem

pytest.importorskip("gptqmodel")

from transformers import AutoModelForCausalLM, AwqConfig  # noqa: E402

from compress.config import parse_config  # noqa: E402
from compress.formats import awq  # noqa: E402
from compress.formats.artifact import open_artifact  # noqa: E402
from compress.formats.writer import is_complete  # noqa: E402
from compress.pipeline import run  # noqa: E402
from compress.quantizers.base import QuantSpec  # noqa: E402
from compress.quantizers.rtn import round_to_nearest  # noqa: E402
from tiny_models import make_model, run_config, save_model, walk_logits  # noqa: E402

log = logging.getLogger(__name__)


def test_gptqmodels_awq_packer_and_dequantizer_agree_with_our_layout():
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm, pack_awq

    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    qw = round_to_nearest(W, QuantSpec(4, 64, False))
    t = awq.linear_tensors("l", qw)
    qweight, qzeros = pack_awq(qw.codes.t().to(torch.int32), qw.zeros.t().to(torch.int32), 4)
    assert torch.equal(qweight, t["l.qweight"]) and torch.equal(qzeros, t["l.qzeros"])
    theirs = dequantize_gemm(t["l.qweight"], t["l.qzeros"], t["l.scales"], 4, 64)  # [in, out] fp16
    ours = (qw.codes.float() - qw.zeros.float().repeat_interleave(64, 1)) * qw.scales.half().float().repeat_interleave(64, 1)
    assert torch.equal(theirs, ours.t().half())


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    model = make_model("llama", seed=11, hidden_size=256, intermediate_size=512, num_key_value_heads=4)
    return save_model(model, tmp_path_factory.mktemp("llama256-awq-eco"), tiny_tokenizer)


def mean_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


# Mean KL(ours || theirs) allowed per backend. "torch_awq" (AwqTorchLinear) dequantizes with
# GPTQModel's `dequantize_gemm` (bit-identical to ours, test above) and multiplies in fp16, we
# in float32: measured 3.8e-6 on the RTN plan. "auto" picks TorchAtenAwqLinear on CPU, which
# repacks for ATen's int4 kernel and runs activations in bf16 (about 3 significant digits):
# measured 2.4e-4, a kernel precision, not a format, difference.
KL_LIMIT = {"torch_awq": 1e-4, "auto": 1e-3}


AWQ_SKIP = {"method": "awq", "bits": 4, "group_size": 64, "sym": False, "grid": 5,
            "skip": [r"layers\.1\.mlp\.down_proj"]}
AWQ_GPTQ = {"method": "awq", "rounding": "gptq", "bits": 4, "group_size": 32, "sym": False, "grid": 5}
RTN = {"method": "rtn", "bits": 4, "group_size": 128, "sym": False}


@pytest.mark.parametrize("quantize,backend", [
    (AWQ_SKIP, "torch_awq"), (AWQ_SKIP, "auto"), (RTN, "torch_awq"), (RTN, "auto"), (AWQ_GPTQ, "torch_awq"),
], ids=["awq-w4-g64-skip-torch_awq", "awq-w4-g64-skip-auto", "rtn-w4-g128-torch_awq", "rtn-w4-g128-auto",
        "awq-gptq-w4-g32-torch_awq"])
def test_pipeline_artifact_loads_in_transformers_with_our_logits(quantize, backend, llama_dir, text_file, tmp_path):
    cfg = parse_config(run_config(llama_dir, text_file, tmp_path / "out", evaluate={"enabled": False},
                                  quantize=quantize, export={"format": "awq"}))
    (res,) = run(cfg).candidates.values()
    assert res.error is None and is_complete(res.artifact, check_hashes=True)
    peer = AutoModelForCausalLM.from_pretrained(
        str(res.artifact), dtype=torch.float32, device_map="cpu",
        quantization_config=AwqConfig(bits=4, backend=backend)).eval()
    assert type(peer.hf_quantizer).__name__ == "AwqQuantizer"
    kernel = type(peer.model.layers[0].self_attn.q_proj).__name__
    if "skip" in quantize:
        assert type(peer.model.layers[1].mlp.down_proj) is torch.nn.Linear
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = torch.cat([peer(ids[w : w + 1]).logits.float() for w in range(ids.shape[0])])
        original = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()
        ref = torch.cat([original(ids[w : w + 1]).logits for w in range(ids.shape[0])])
    ours = walk_logits(open_artifact(res.artifact, torch.device("cpu"), torch.float32), ids)
    kl, q_kl = mean_kl(ours, theirs), mean_kl(ref, ours)
    diff = float((ours - theirs).abs().max())
    log.info("%s/%s (%s): KL(ours || theirs) %.3g, max |diff| %.3g; KL(original || ours) %.3g",
             quantize["method"], backend, kernel, kl, diff, q_kl)
    print(f"{quantize['method']}/{backend} ({kernel}): KL(ours||theirs) {kl:.3g}, max|diff| {diff:.3g}, "
          f"KL(original||ours) {q_kl:.3g}")
    assert kl < KL_LIMIT[backend]
    assert q_kl > 100 * kl  # quantization moves the logits far beyond the loaders' disagreement
