"""MatMulNBits tensors from our codes: ONNX Runtime's own op against our dequantized weight."""
from __future__ import annotations

import pytest
import torch

from compress.formats.matmulnbits import nbytes, to_matmulnbits
from compress.formats.qweight import QuantizedWeight

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def random_qweight(out_f, in_f, bits, group_size, sym, act_order=False, seed=0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    gs = in_f if group_size == -1 else group_size
    n_g = -(-in_f // gs)
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = torch.rand(out_f, n_g, generator=g) * 0.1 + 0.01
    zeros = (torch.full((out_f, n_g), 1 << (bits - 1), dtype=torch.uint8) if sym
             else torch.randint(0, 1 << bits, (out_f, n_g), generator=g, dtype=torch.uint8))
    g_idx = torch.arange(in_f, dtype=torch.int32) // gs
    if act_order:  # GPTQ desc_act: group i // gs of the i-th column in a permuted order
        perm = torch.randperm(in_f, generator=g)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = torch.arange(in_f, dtype=torch.int32) // gs
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size, sym, desc_act=act_order)


def run_op(t, x: torch.Tensor) -> torch.Tensor:
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(t.B.numpy(), "B"), numpy_helper.from_array(t.scales.numpy(), "s")]
    ins = ["xp" if t.perm is not None else "x", "B", "s"]
    nodes = []
    if t.zero_points is not None:
        inits.append(numpy_helper.from_array(t.zero_points.numpy(), "z"))
        ins.append("z")
    if t.perm is not None:
        inits.append(numpy_helper.from_array(t.perm.numpy(), "perm"))
        nodes.append(helper.make_node("Gather", ["x", "perm"], ["xp"], axis=-1))
    nodes.append(helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=t.K, N=t.N,
                                  bits=t.bits, block_size=t.block_size))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, t.K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, t.N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])


CASES = [(4, 64, True, False), (4, 64, False, False), (4, 32, False, True), (8, 128, True, False),
         (8, 64, False, True), (4, -1, False, False), (8, -1, True, False)]


@pytest.mark.parametrize("bits,group_size,sym,act_order", CASES)
def test_ort_matmulnbits_equals_our_dequantized_weight(bits, group_size, sym, act_order):
    qw = random_qweight(96, 320 if group_size != 128 else 384, bits, group_size, sym, act_order)
    t = to_matmulnbits(qw)
    assert (t.zero_points is None) == sym and (t.perm is None) == (not act_order)
    x = torch.randn(5, qw.shape[1], generator=torch.Generator().manual_seed(1))
    want = x.double() @ qw.dequantize(torch.float64).T
    got = run_op(t, x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    # the same layer with one code changed gives a different answer: the op reads every code
    if not act_order and group_size != -1:
        codes = qw.codes.clone()
        codes[7, 3] = (int(codes[7, 3]) + 1) % (1 << bits)
        t2 = to_matmulnbits(QuantizedWeight(codes, qw.scales, qw.zeros, qw.g_idx, bits, group_size, sym))
        assert not torch.allclose(run_op(t2, x)[:, 7], got[:, 7])


@pytest.mark.parametrize("bits,group_size,sym,act_order", CASES)
def test_nbytes_is_the_written_size(bits, group_size, sym, act_order):
    qw = random_qweight(96, 320, bits, group_size, sym, act_order)
    t = to_matmulnbits(qw)
    written = sum(x.numel() * x.element_size() for x in (t.B, t.scales, t.zero_points) if x is not None)
    assert nbytes(96, 320, bits, group_size, sym) == written


@pytest.mark.parametrize("in_f,block", [(576, 64), (1536, 128), (320, 64), (100, 128), (48, 16)])
def test_per_channel_blocks_take_the_fewest_bytes(in_f, block):
    qw = random_qweight(8, in_f, 8, -1, False)
    t = to_matmulnbits(qw)
    assert t.block_size == block
    old = 8 * (-(-in_f // 128) * 128 + 4 * -(-in_f // 128) + -(-in_f // 128))  # 128-column blocks, padded
    assert nbytes(8, in_f, 8, -1, False) <= old
    x = torch.randn(3, in_f, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(run_op(t, x).double(), x.double() @ qw.dequantize(torch.float64).T,
                               rtol=1e-4, atol=1e-3)  # float32 sums over up to 1536 columns


def test_unequal_groups_and_foreign_bits_are_refused():
    qw = random_qweight(8, 64, 4, 32, True)
    bad = QuantizedWeight(qw.codes, qw.scales, qw.zeros, torch.zeros(64, dtype=torch.int32), 4, 32, True, True)
    with pytest.raises(ValueError, match="not all group_size columns"):
        to_matmulnbits(bad)
    three = QuantizedWeight(qw.codes % 8, qw.scales, torch.full_like(qw.zeros, 4), qw.g_idx, 3, 32, True)
    with pytest.raises(ValueError, match="bits"):
        to_matmulnbits(three)


def test_concat_stacks_rows_as_the_ops_side_by_side():
    """q/k/v-like layers of one input (one act-order permutation; symmetric next to asymmetric)
    as one op give the separate ops' outputs; layouts that differ are refused."""
    from dataclasses import replace

    from compress.formats.matmulnbits import concat

    q = random_qweight(64, 256, 4, 32, sym=False, act_order=True, seed=1)
    k = replace(random_qweight(32, 256, 4, 32, sym=True, seed=2), g_idx=q.g_idx, desc_act=True)
    v = replace(random_qweight(32, 256, 4, 32, sym=False, seed=3), g_idx=q.g_idx, desc_act=True)
    parts = [to_matmulnbits(w) for w in (q, k, v)]
    t = concat(parts)
    assert t.N == 128 and t.zero_points is not None and torch.equal(t.perm, parts[0].perm)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(run_op(t, x), torch.cat([run_op(p, x) for p in parts], -1), rtol=0, atol=1e-5)
    other = to_matmulnbits(random_qweight(32, 256, 4, 32, sym=False, act_order=True, seed=5))
    assert concat([parts[0], other]) is None  # another permutation
    assert concat([parts[1], to_matmulnbits(random_qweight(32, 256, 4, 64, sym=True))]) is None  # block size
    assert concat([parts[1], to_matmulnbits(random_qweight(32, 256, 8, 32, sym=True))]) is None  # bits
