"""The joint KL of whole allocations (`compress.mixed.joint`): it equals the KL of the model run
with every chosen tensor rounded at once, and the embedding/head option an allocation keeps
under `outer_choice: measured` (the default) is the one whose allocation measures lowest."""
from __future__ import annotations

import pytest
import torch

from compress.config import parse_config
from compress.mixed.joint import joint_kl
from compress.mixed.outer import rounded
from compress.pipeline import run
from compress.quantizers.base import QuantSpec
from compress.quantizers.rtn import round_to_nearest
from compress.stages.load import load_model
from test_mixed_pipeline import mean_kl
from test_outer import tied  # noqa: F401  (the tied tiny Llama fixture)
from tiny_models import VOCAB, make_model, run_config


def test_joint_kl_is_the_kl_with_every_chosen_tensor_rounded(tied, text_file, tmp_path):
    src, model = tied
    sm = load_model(parse_config(run_config(src, text_file, tmp_path / "x")).model).streamed()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    four, eight = QuantSpec(4, 32, False), QuantSpec(8, 32, True)
    linears = [{}, {n: four for n in names[::2]} | {n: eight for n in names[1::2]}, {names[0]: four}]
    tables = [None, QuantSpec(4, 32, True), None]
    as_rows = lambda s: None if s is None else (lambda t: rounded(t, s))  # noqa: E731
    got = joint_kl(sm, ids, linears, [as_rows(t) for t in tables], [as_rows(t) for t in tables])
    model = model.float().eval()
    with torch.no_grad():
        ref = model(ids).logits
        for specs, table, kl in zip(linears, tables, got):
            q = make_model("llama", tie_word_embeddings=True).float().eval()
            q.load_state_dict(model.state_dict())
            mods = dict(q.named_modules())
            for n, spec in specs.items():  # an independent rounding: the layer's weight, to nearest
                w = mods[n].weight
                w.copy_(round_to_nearest(w.float(), spec).dequantize(torch.float32))
            if table is not None:  # tied: the embedding's rows and the head's
                w = q.get_input_embeddings().weight
                w.copy_(rounded(w, table))
            assert kl == pytest.approx(mean_kl(ref, q(ids).logits), rel=1e-3, abs=1e-7)
    assert got[0] < 1e-9 < got[2] < got[1]


@pytest.mark.parametrize("choice", ["measured", "predicted"])
def test_the_table_kept_is_the_one_whose_allocation_measures_lowest(tied, text_file, tmp_path, choice):
    src, _ = tied
    data = run_config(src, text_file, tmp_path / "out", evaluate={"enabled": False},
                      export={"format": "onnx", "dtype": "float32"},
                      quantize={"method": "rtn", "bits": 4, "group_size": 32,
                                # the float32 table does not fit beside the linears: ONNX shares it as the head
                                "target": {"max_bytes": 330_000}, "target_options": {"outer_choice": choice}})
    (res,) = run(parse_config(data)).candidates.values()
    a = res.allocation
    assert res.error is None
    if choice == "predicted":
        assert a["outer_measured"] is None
        return
    rows = a["outer_measured"]
    assert len(rows) > 1 and sum(r["chosen"] for r in rows) == 1
    best = min(rows, key=lambda r: r["joint_rtn_kl"])
    assert best["chosen"] and best["bytes"] <= 330_000
    h = a["outer"]["lm_head"]
    assert best["lm_head"] == ("float" if h["bits"] is None else f"{h['bits']}/{h['group_size']}/"
                               + ("sym" if h["sym"] else "asym"))
