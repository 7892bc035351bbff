"""End to end: a `quantize.target` run writes its allocation as exact per-layer metadata that
our loader and transformers + compressed-tensors read back identically; a budget that cannot
be met exits 2 naming `quantize.target`."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from compress.cli import main
from compress.config import parse_config
from compress.formats.artifact import open_artifact
from compress.formats.quant_linear import QuantLinear
from compress.pipeline import run
from compress.serving import safetensors_tensor_bytes
from tiny_models import VOCAB, run_config, walk_logits


def mean_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def loaded_schemes(artifact) -> dict[str, tuple]:
    """(bits, group_size, sym) of every linear as our loader builds it; None when in float."""
    sm = open_artifact(artifact, torch.device("cpu"), torch.float32)
    out = {}
    for i in range(sm.n_blocks):
        block = sm.load_block(i)
        for n, m in block.named_modules():
            full = f"{sm.block_prefix}{i}.{n}"
            if isinstance(m, QuantLinear):
                out[full] = (m.bits, m.group_size, m.sym)
            elif isinstance(m, torch.nn.Linear):
                out[full] = None
    return out


def allocated(res) -> dict[str, tuple]:
    return {l["name"]: None if l["bits"] is None else (l["bits"], l["group_size"], l["sym"])
            for l in res.allocation["layers"]}


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_bits_per_weight_target_writes_the_allocation_exactly(fmt, model_dir, text_file, tmp_path):
    cfg = parse_config(run_config(
        model_dir("llama"), text_file, tmp_path / "out", evaluate={"enabled": False},
        quantize={"method": "rtn", "bits": 4, "group_size": 64, "target": {"bits_per_weight": 3.5}},
        export={"format": fmt}))
    ctx = run(cfg)
    (res,) = ctx.candidates.values()
    assert res.error is None and res.plan.name == "rtn-w4-g64-bpw3.5"
    alloc = res.allocation
    want = allocated(res)
    assert len(set(want.values())) > 1  # a mixed allocation, or this test shows nothing
    assert alloc["achieved_bytes"] <= alloc["budget_bytes"] and alloc["slots_bits_per_weight"] <= 3.5
    manifest = json.loads((res.artifact / "compress-manifest.json").read_text())
    assert manifest["allocation"] == json.loads(json.dumps(alloc))
    assert loaded_schemes(res.artifact) == want
    report = (tmp_path / "out" / "report.md").read_text()
    first = alloc["layers"][0]
    cell = f"{first['bits']}/{'ch' if first['group_size'] == -1 else 'g' + str(first['group_size'])}"
    cell += "" if first["sym"] else "a"  # the report marks asymmetric grids
    assert "## Mixed precision" in report and f"| 0 | {cell} |" in report
    assert f"| {alloc['achieved_bytes']:,} |" in report
    if fmt == "compressed-tensors":
        _transformers_agrees(res, want)


def _transformers_agrees(res, want):
    from transformers import AutoModelForCausalLM

    peer = AutoModelForCausalLM.from_pretrained(str(res.artifact), dtype=torch.float32, device_map="cpu").eval()
    theirs_schemes = {}
    for name in want:
        scheme = getattr(peer.get_submodule(name), "quantization_scheme", None)
        w = None if scheme is None else scheme.weights
        theirs_schemes[name] = None if w is None else (
            w.num_bits, -1 if w.strategy == "channel" else w.group_size, w.symmetric)
    assert theirs_schemes == want
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = torch.cat([peer(ids[w : w + 1]).logits for w in range(ids.shape[0])])
    ours = walk_logits(open_artifact(res.artifact, torch.device("cpu"), torch.float32), ids)
    assert mean_kl(ours, theirs) < 1e-4


def test_max_bytes_target_predicts_the_artifact_bytes_exactly(model_dir, text_file, tmp_path):
    base = run_config(model_dir("llama"), text_file, tmp_path / "out", evaluate={"enabled": False},
                      quantize={"method": "rtn", "bits": 4, "group_size": 64})
    uniform = run(parse_config(base))
    (u,) = uniform.candidates.values()
    size = safetensors_tensor_bytes(u.artifact)
    budgets = [size - 20_000, size]
    got = []
    for k, b in enumerate(budgets):
        cfg = dict(base, quantize={**base["quantize"], "target": {"max_bytes": b}},
                   export={**base["export"], "output_dir": str(tmp_path / f"mb{k}")})
        (res,) = run(parse_config(cfg)).candidates.values()
        assert res.allocation["achieved_bytes"] == safetensors_tensor_bytes(res.artifact) <= b
        got.append(res.allocation["predicted_loss"])
    assert got[1] <= got[0]  # more bytes never predict more loss


@pytest.mark.parametrize("target,message", [
    # 2-bit per channel everywhere: per block 147,456 weights x 2 bits, 1,024 rows x an fp16
    # scale, 7 x a 16-byte weight_shape: 312,192 bits, 2.117 per weight.
    ({"bits_per_weight": 2.0}, "error: quantize.target: bits_per_weight 2 is below the smallest reachable with "
                               "quantize.target_options, 2.117 bits per weight"),
    ({"max_bytes": 1000}, "error: quantize.target: max_bytes 1,000 is below the smallest artifact reachable"),
])
def test_a_budget_that_cannot_be_met_exits_2_naming_the_target(target, message, model_dir, text_file, tmp_path):
    data = run_config(model_dir("llama"), text_file, tmp_path / "out",
                      quantize={"method": "rtn", "bits": 4, "group_size": 64, "sym": True, "target": target})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, ["-q", "run", str(path)])
    assert res.exit_code == 2, res.output
    assert message in res.stderr
    assert not list((tmp_path / "out").glob("*/compress-manifest.json"))


def test_a_comparison_holds_mixed_candidates_beside_uniform_ones(model_dir, text_file, tmp_path, monkeypatch):
    import compress.mixed.sensitivity as sensitivity

    walks = []
    measure = sensitivity.measure
    monkeypatch.setattr(sensitivity, "measure", lambda *a, **k: walks.append(1) or measure(*a, **k))
    data = run_config(model_dir("llama"), text_file, tmp_path / "out", evaluate={"enabled": False},
                      quantize={"method": "rtn", "bits": 4, "group_size": 64})
    data["candidates"] = [{"bits": 3}, {"target": {"bits_per_weight": 3.5}}, {"target": {"bits_per_weight": 3.0}},
                          {"name": "too-small", "target": {"bits_per_weight": 1.0}}]
    ctx = run(parse_config(data))
    res = ctx.candidates
    assert list(res) == ["rtn-w3-g64", "rtn-w4-g64-bpw3.5", "rtn-w4-g64-bpw3", "too-small"]
    assert res["too-small"].error.startswith("quantize.target: bits_per_weight 1 is below the smallest reachable")
    assert res["rtn-w3-g64"].allocation is None and res["rtn-w3-g64"].error is None
    a35, a3 = res["rtn-w4-g64-bpw3.5"].allocation, res["rtn-w4-g64-bpw3"].allocation
    assert a3["predicted_loss"] >= a35["predicted_loss"]  # fewer bits, no less predicted loss
    # one sensitivity walk serves both mixed candidates; the table covers every layer
    assert len(walks) == 1
    assert set(ctx.sensitivity) == {l["name"] for l in a35["layers"]}
    comparison = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert set(comparison["allocations"]) == {"rtn-w4-g64-bpw3.5", "rtn-w4-g64-bpw3"}
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| rtn-w4-g64-bpw3 | bits_per_weight=3.0 |" in md


@pytest.mark.parametrize("gpu,message", [
    ("RTX 9999", "error: quantize.target.gpu: 'RTX 9999' is not in the GPU table (serving.gpus): 8 GB (RTX 4060"),
    ("GB", "error: quantize.target.gpu: 'GB' matches several GPUs"),
])
def test_validate_names_an_unknown_gpu(gpu, message, model_dir, text_file, tmp_path):
    data = run_config(model_dir("llama"), text_file, tmp_path / "out",
                      quantize={"method": "rtn", "bits": 4, "group_size": 64, "target": {"gpu": gpu}})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, ["-q", "validate", str(path)])
    assert res.exit_code == 2 and message in res.stderr, res.output
    ok = CliRunner().invoke(main, ["-q", "validate", str(path), "--set", "quantize.target.gpu=RTX 4060"])
    assert ok.exit_code == 0 and "rtn-w4-g64-gpu" in ok.output, ok.output


def test_relative_predictor_minimises_the_loss_over_each_layers_output_energy(model_dir, text_file, tmp_path):
    data = run_config(model_dir("llama"), text_file, tmp_path / "out", evaluate={"enabled": False},
                      quantize={"method": "rtn", "bits": 4, "group_size": 64})
    data["candidates"] = [{"name": "abs", "target": {"bits_per_weight": 3.25},
                           "target_options": {"predictor": "output_error"}},
                          {"name": "rel", "target": {"bits_per_weight": 3.25},
                           "target_options": {"predictor": "relative_output_error"}}]
    ctx = run(parse_config(data))
    sens = ctx.sensitivity

    def summed(alloc, relative):
        total = 0.0
        for l in alloc["layers"]:
            key = "float" if l["bits"] is None else f"{l['bits']}/{l['group_size']}/{'sym' if l['sym'] else 'asym'}"
            total += sens[l["name"]][key] / (sens[l["name"]]["output_energy"] if relative else 1.0)
        return total

    a, r = ctx.candidates["abs"].allocation, ctx.candidates["rel"].allocation
    assert a["predicted_loss"] == pytest.approx(summed(a, False))
    assert r["predicted_loss"] == pytest.approx(summed(r, True))
    assert "output energy" in r["predictor"] and "output energy" not in a["predictor"]
    # each is optimal for its own predictor, so neither beats the other on the other's terms
    assert summed(a, True) >= r["predicted_loss"] - 1e-9 and summed(r, False) >= a["predicted_loss"] - 1e-9
