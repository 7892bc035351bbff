"""ONNX export: the decoder in ONNX Runtime against our torch loader of the same codes (a
compressed-tensors artifact of the same deterministic run), greedy decoding with the KV cache
token for token, onnxruntime-genai on the folder, the evaluation path, and configs the format
cannot hold (exit 2 at preflight)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from compress.config import ConfigError, parse_config  # noqa: E402
from compress.evaluate.onnx_runtime import OrtDecoder, head_inputs, head_slices  # noqa: E402
from compress.formats.artifact import open_artifact  # noqa: E402
from compress.formats.writer import is_complete  # noqa: E402
from compress.pipeline import preflight, run  # noqa: E402
from tiny_models import family_tokenizer, make_model, run_config, save_model, walk_logits  # noqa: E402

CASES = {
    # GPTQ act-order with dynamic groups, asymmetric: the permutation and the zero points
    "llama-gptq-w4-g32-act-asym": ("llama", {"method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
                                            "static_groups": False, "sym": False}),
    # attention biases and a tied head; 8-bit, symmetric (the op's default zero point)
    "qwen2-rtn-w8-g64-tied": ("qwen2", {"method": "rtn", "bits": 8, "group_size": 64, "sym": True}),
    # per-channel grid; one linear left in float
    "mistral-rtn-w4-perchannel-skip": ("mistral", {"method": "rtn", "bits": 4, "group_size": -1, "sym": True,
                                                   "skip": [r"mlp\.down_proj"]}),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, text_file):
    """`pair(case)`: (source, ONNX artifact, GPTQ artifact) of one deterministic quantization run."""
    made = {}

    def get(case):
        if case not in made:
            family = CASES[case][0]
            tmp = tmp_path_factory.mktemp(case)
            src = save_model(make_model(family, seed=3, tie_word_embeddings=family == "qwen2"), tmp / "src",
                             family_tokenizer(family))
            made[case] = (src, export(case, src, text_file, tmp / "onnx", "onnx", onnx_accuracy_level=0),
                          export(case, src, text_file, tmp / "gptq", "gptq"))
        return made[case]

    return get


def export(case, src, text_file, out, fmt, **options):
    """The artifact of `case`'s deterministic quantization run in format `fmt`. The ONNX one
    of `pair` computes in float32 (accuracy_level 0), so its logits equal the torch loader's."""
    cfg = parse_config(run_config(src, text_file, out, evaluate={"enabled": False}, quantize=CASES[case][1],
                                  export={"format": fmt, "dtype": "float32", **options}))
    (res,) = run(cfg).candidates.values()
    assert res.error is None and is_complete(res.artifact, check_hashes=True)
    return res.artifact


def _unpack(b: np.ndarray, bits: int, n: int) -> np.ndarray:
    """uint8 rows, low bits first -> [rows, n] values (written from the op's spec, not our packer)."""
    b = b.reshape(b.shape[0], -1).astype(np.int64)
    if bits == 8:
        return b[:, :n]
    vals = np.stack([(b >> s) & 15 for s in (0, 4)], -1).reshape(b.shape[0], -1)
    return vals[:, :n]


def onnx_layers(onnx_dir) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every MatMulNBits layer of the graph as (codes [N, K] in column order, W [N, K] float64)."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(onnx_dir / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    out = {}
    for node in m.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        K, N, bits, bs = a["K"], a["N"], a["bits"], a["block_size"]
        name = node.input[1][: -len(".MatMulNBits.B")]
        codes = _unpack(inits[node.input[1]], bits, K)
        kb = inits[node.input[1]].shape[1]
        zp = (_unpack(inits[node.input[3]], bits, kb) if len(node.input) > 3 and node.input[3]
              else np.full((N, kb), 1 << (bits - 1)))
        blk = np.arange(K) // bs
        w = (codes - zp[:, blk]) * inits[node.input[2]].astype(np.float64)[:, blk]
        perm = inits.get(f"{name}.MatMulNBits.perm")
        if perm is not None:  # B holds the columns in `perm` order
            nat_codes, nat_w = np.empty_like(codes), np.empty_like(w)
            nat_codes[:, perm], nat_w[:, perm] = codes, w
            codes, w = nat_codes, nat_w
        out[name] = (codes, w)
    return split_fused(onnx_dir, out)


def split_fused(onnx_dir, layers: dict) -> dict:
    """Fused layers (q/k/v, gate/up stacked along N) as their parts, by the model's shapes."""
    from compress.formats.onnx_graph import FUSED

    c = json.loads((onnx_dir / "config.json").read_text())
    hd = c["hidden_size"] // c["num_attention_heads"]
    rows = {"self_attn.q_proj": c["num_attention_heads"] * hd, "self_attn.k_proj": c["num_key_value_heads"] * hd,
            "self_attn.v_proj": c["num_key_value_heads"] * hd, "mlp.gate_proj": c["intermediate_size"],
            "mlp.up_proj": c["intermediate_size"]}
    out = {}
    for name, (codes, w) in layers.items():
        fused = next((f for f in FUSED if name.endswith("." + f)), None)
        if fused is None:
            out[name] = (codes, w)
            continue
        start = 0
        for part in FUSED[fused]:
            n = rows[part]
            out[name[: -len(fused)] + part] = (codes[start : start + n], w[start : start + n])
            start += n
        assert start == codes.shape[0], name
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_onnx_holds_our_codes_and_ort_runs_them(case, pair):
    """The graph's MatMulNBits layers hold the GPTQ artifact's codes; ORT's logits equal a
    float model given the weights those tensors stand for; and the quantization shows."""
    from transformers import AutoModelForCausalLM

    src, onnx_dir, gptq_dir = pair(case)
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "config.json",
            "compress-manifest.json"} <= {p.name for p in onnx_dir.iterdir()}
    layers = onnx_layers(onnx_dir)
    ours = open_artifact(gptq_dir, torch.device("cpu"), torch.float32).materialize_all()
    theirs = {n: m for n, m in ours.named_modules() if hasattr(m, "quantized_weight")}
    assert sorted(layers) == sorted(theirs) and layers
    for n, (codes, _) in layers.items():
        np.testing.assert_array_equal(codes, theirs[n].quantized_weight().codes.numpy(), err_msg=n)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        orig = model(ids).logits
        for n, (_, w) in layers.items():
            model.get_submodule(n).weight.copy_(torch.from_numpy(w))
        ref = model(ids).logits
    got = OrtDecoder(onnx_dir).logits(ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    assert (orig - got).abs().max() > 100 * (got - ref).abs().max()
    # and our torch loader of the GPTQ artifact (fp16 scales there, float32 here)
    torch.testing.assert_close(got, walk_logits(open_artifact(gptq_dir, torch.device("cpu"), torch.float32), ids),
                               rtol=0, atol=3e-2)


@pytest.mark.parametrize("case", ["llama-gptq-w4-g32-act-asym", "qwen2-rtn-w8-g64-tied"])
def test_greedy_decoding_with_the_cache_is_token_identical(case, pair):
    _, onnx_dir, gptq_dir = pair(case)
    prompt = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(5))
    model = open_artifact(gptq_dir, torch.device("cpu"), torch.float32).materialize_all()
    want, past, ids = [], None, prompt
    with torch.no_grad():
        for _ in range(32):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
            want.append(nxt)
            ids = torch.tensor([[nxt]])
    assert OrtDecoder(onnx_dir).greedy(prompt, 32) == want
    assert len(set(want)) > 3  # a real sequence, not one token repeated


def test_generate_runs_an_onnx_artifact_in_onnx_runtime(pair):
    from compress.runtime.generate import Sampling, generate
    from compress.runtime.registry import kind_of, open_decoder

    _, onnx_dir, _ = pair("llama-gptq-w4-g32-act-asym")
    prompt = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(5))
    assert kind_of(onnx_dir) == "onnx"
    dec = open_decoder(onnx_dir, torch.device("cpu"))
    assert dec.label == "onnxruntime MatMulNBits"
    got = list(generate(dec, prompt[0].tolist(), 32, Sampling(temperature=0), stop_ids=set()))
    assert got == OrtDecoder(onnx_dir).greedy(prompt, 32)


def test_onnxruntime_genai_generates_the_same_tokens(pair):
    og = pytest.importorskip("onnxruntime_genai")
    _, onnx_dir, _ = pair("llama-gptq-w4-g32-act-asym")
    prompt = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(5))
    model = og.Model(str(onnx_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=8 + 32, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt.tolist())
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    assert got == OrtDecoder(onnx_dir).greedy(prompt, 32)
    tok = og.Tokenizer(model)  # the folder's tokenizer files load in genai (its BOS template aside)
    text = "the river was founded"
    assert list(tok.encode(text)) == family_tokenizer("llama")(text, add_special_tokens=False)["input_ids"]


def test_evaluation_reads_the_head_inputs_and_the_head_of_the_artifact(pair):
    """What the evaluate stage uses (decoder up to the final norm in ORT, head from the data
    file) gives the graph's own logits."""
    _, onnx_dir, _ = pair("qwen2-rtn-w8-g64-tied")
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(4))
    x = head_inputs(onnx_dir, ids)
    head = torch.cat([w for _, w, _ in head_slices(onnx_dir, 100)])
    assert head.shape == (512, 128)
    torch.testing.assert_close(x @ head.T, OrtDecoder(onnx_dir).logits(ids), rtol=0, atol=1e-4)


def test_pipeline_evaluates_an_onnx_candidate_like_the_others(model_dir, text_file, tmp_path):
    q = {"method": "rtn", "bits": 4, "group_size": 32, "sym": False}
    rows = {}
    for fmt in ("onnx", "compressed-tensors"):
        exact = {"onnx_accuracy_level": 0} if fmt == "onnx" else {}  # float32 compute, as torch's
        cfg = parse_config(run_config(model_dir("llama"), text_file, tmp_path / fmt, quantize=q,
                                      export={"format": fmt, "dtype": "float32", **exact}))
        (res,) = run(cfg).candidates.values()
        rows[fmt] = res.metrics
        results = json.loads((res.artifact / "compress-results.json").read_text())
        assert results
        if fmt == "onnx":  # the serving columns (fits-on-GPU) count the initializers, in the data file
            from compress.serving import safetensors_tensor_bytes

            data = (res.artifact / "model.onnx.data").stat().st_size
            assert data - 64 * 200 < safetensors_tensor_bytes(res.artifact) <= data  # 64-byte alignment
    a, b = rows["onnx"], rows["compressed-tensors"]
    assert a.bytes > 0 and abs(a.perplexity - b.perplexity) < 1e-3 * b.perplexity
    assert a.kl_divergence > 0 and abs(a.kl_divergence - b.kl_divergence) < 1e-3 * b.kl_divergence + 1e-7
    assert a.top1_agreement == b.top1_agreement


# ---- configs the format cannot hold ---------------------------------------------------------
@pytest.mark.parametrize("quantize,export,message", [
    ({"bits": 3, "group_size": 32}, {}, "quantize.bits: MatMulNBits holds bits 4 or 8, got 3"),
    ({"bits": 4, "group_size": 8}, {}, "quantize.group_size: MatMulNBits blocks are a power of two >= 16"),
    ({"bits": 4, "group_size": 32}, {"dtype": "float16"}, "export.dtype: onnx export writes a float32 graph"),
])
def test_preflight_names_the_key(quantize, export, message, model_dir, text_file, tmp_path):
    cfg = parse_config(run_config(model_dir("llama"), text_file, tmp_path / "out", quantize=quantize,
                                  export={"format": "onnx", "dtype": "float32", **export}))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        preflight(cfg, tmp_path / "out")


def test_family_without_a_mapping_exits_2(model_dir, text_file, tmp_path):
    import yaml
    from click.testing import CliRunner

    from compress.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(run_config(model_dir("gemma"), text_file, tmp_path / "out",
                                             quantize={"bits": 4, "group_size": 32},
                                             export={"format": "onnx", "dtype": "float32"})))
    res = CliRunner().invoke(main, ["run", str(cfg)])
    assert res.exit_code == 2, res.output
    assert "export.format: onnx: model_type 'gemma' has no ONNX mapping yet" in res.output


def test_accuracy_level_4_is_the_default_and_reaches_every_matmulnbits(model_dir, text_file, tmp_path):
    import onnx
    from onnx import helper

    cfg = parse_config(run_config(model_dir("llama"), text_file, tmp_path / "out", evaluate={"enabled": False},
                                  quantize={"bits": 8, "group_size": 32},
                                  export={"format": "onnx", "dtype": "float32"}))
    (res,) = run(cfg).candidates.values()
    m = onnx.load(str(res.artifact / "model.onnx"), load_external_data=False)
    levels = [helper.get_attribute_value(a) for n in m.graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"]
    assert levels == [4] * 8  # per block: q/k/v as one op, o, gate/up as one op, down


# ---- fused linears and accuracy levels ------------------------------------------------------
def _graph(onnx_dir):
    import onnx

    return onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph


def test_fused_qkv_and_gate_up_give_the_unfused_graphs_logits(pair, text_file, tmp_path, monkeypatch):
    """Act-order q/k/v share one permutation (one Hessian), so they are one MatMulNBits behind
    one Gather; the graph with every linear its own op gives the same logits and tokens."""
    from compress.formats.onnx_writer import ONNXArtifactWriter

    case = "llama-gptq-w4-g32-act-asym"
    src, fused, _ = pair(case)
    g = _graph(fused)
    ops = [n.input[1] for n in g.node if n.op_type == "MatMulNBits"]
    assert len(ops) == 8 and sum("qkv_proj" in o for o in ops) == 2 and sum("gate_up_proj" in o for o in ops) == 2
    assert sum(n.op_type == "Gather" and n.input[1].endswith(".perm") for n in g.node) == 8  # one per op
    assert sum(n.op_type == "SkipSimplifiedLayerNormalization" for n in g.node) == 4
    monkeypatch.setattr(ONNXArtifactWriter, "fused", {})
    plain = export(case, src, text_file, tmp_path / "plain", "onnx", onnx_accuracy_level=0)
    assert sum(n.op_type == "MatMulNBits" for n in _graph(plain).node) == 14
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(OrtDecoder(fused).logits(ids), OrtDecoder(plain).logits(ids), rtol=0, atol=1e-5)
    prompt = ids[:1, :8]
    assert OrtDecoder(fused).greedy(prompt, 16) == OrtDecoder(plain).greedy(prompt, 16)


def test_linears_whose_layouts_differ_stay_separate_ops():
    """q/k/v with different act-order permutations (as a mixed plan could give) are not
    stacked; gate/up of the same block still are."""
    from compress.formats.matmulnbits import to_matmulnbits
    from compress.formats.onnx_writer import fuse_linears, nbits_tensors
    from test_matmulnbits import random_qweight

    p = "model.layers.0."
    shapes = {"self_attn.q_proj": 64, "self_attn.k_proj": 32, "self_attn.v_proj": 32, "mlp.gate_proj": 96,
              "mlp.up_proj": 96}
    tensors = {}
    for i, (n, rows) in enumerate(shapes.items()):
        qw = random_qweight(rows, 128, 4, 32, sym=False, act_order=n.startswith("self_attn"), seed=i)
        tensors.update(nbits_tensors(p + n, to_matmulnbits(qw)))
    out = fuse_linears(tensors)
    assert {k for k in tensors if k.startswith(p + "self_attn")} == {k for k in out if k.startswith(p + "self_attn")}
    assert out[p + "mlp.gate_up_proj.MatMulNBits.B"].shape[0] == 192 and p + "mlp.gate_proj.MatMulNBits.B" not in out
    torch.testing.assert_close(out[p + "mlp.gate_up_proj.MatMulNBits.scales"],
                               torch.cat([tensors[p + f"mlp.{n}_proj.MatMulNBits.scales"] for n in ("gate", "up")]))


def test_accuracy_level_4_rounds_activations_within_the_weights_error(pair, text_file, tmp_path):
    """The default (int8 activations in the op) moves the logits, by less than the weight
    quantization itself does."""
    from transformers import AutoModelForCausalLM

    case = "llama-gptq-w4-g32-act-asym"
    src, level0, _ = pair(case)
    level4 = export(case, src, text_file, tmp_path / "l4", "onnx")
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        orig = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()(ids).logits
    a, b = OrtDecoder(level0).logits(ids), OrtDecoder(level4).logits(ids)
    assert 0 < (a - b).abs().max() < 0.5 * (orig - a).abs().max()


def test_a_bits_per_weight_target_writes_each_layer_its_own_matmulnbits(model_dir, text_file, tmp_path):
    """`quantize.target` under ONNX: each MatMulNBits node carries its layer's allocated bits and
    block size, and ORT's logits equal our loader's view of the same graph's weights."""
    import onnx

    from compress.formats.onnx_format import ONNX_FILE

    cfg = parse_config(run_config(model_dir("llama"), text_file, tmp_path / "out", evaluate={"enabled": False},
                                  quantize={"bits": 4, "group_size": 32, "target": {"bits_per_weight": 6},
                                            "target_options": {"bits": [4, 8], "group_sizes": [32, 64],
                                                               "unquantized": False}},
                                  export={"format": "onnx", "dtype": "float32"}))
    (res,) = run(cfg).candidates.values()
    want = {l["name"]: (l["bits"], l["group_size"]) for l in res.allocation["layers"]}
    assert len(set(want.values())) > 1
    m = onnx.load(str(res.artifact / ONNX_FILE), load_external_data=False)
    got = {}
    for n in m.graph.node:
        if n.op_type == "MatMulNBits" and not n.input[1].startswith("lm_head"):
            attrs = {a.name: a.i for a in n.attribute}
            name = n.input[1].rsplit(".MatMulNBits", 1)[0]
            prefix, _, local = name.rpartition(".")
            # q/k/v (gate/up) of one grid are one fused node
            members = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
            for member in members.get(local, [local]):
                got[f"{prefix}.{member}"] = (attrs["bits"], attrs["block_size"])
    assert got == want
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(head_inputs(res.artifact, ids) @ torch.cat([w for _, w, _ in head_slices(res.artifact, 100)]).T,
                               OrtDecoder(res.artifact).logits(ids), rtol=0, atol=1e-4)
