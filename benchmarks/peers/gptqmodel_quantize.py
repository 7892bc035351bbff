"""GPTQModel's GPTQ on a model folder with given calibration windows; run in .venv-peers.

    python benchmarks/peers/gptqmodel_quantize.py MODEL_DIR WINDOWS.safetensors OUT_DIR BITS GROUP

GPTQModel's own defaults otherwise (its QuantizeConfig). Prints one JSON line: the seconds spent
in `quantize()` alone (loading and saving excluded) and the package version. The caller measures
the process's peak RSS. Set GPTQMODEL_CPU_WORKERS=2 on a 2-core machine.
"""
import json
import sys
import time

import torch
from safetensors.torch import load_file


def main(model_dir: str, windows: str, out_dir: str, bits: str, group: str) -> None:
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    ids = load_file(windows)["input_ids"]
    calib = [{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in ids]
    qcfg = QuantizeConfig(bits=int(bits), group_size=int(group))
    model = GPTQModel.load(model_dir, qcfg, dtype=torch.float32, device="cpu")
    t0 = time.perf_counter()
    model.quantize(calib, batch_size=1)
    seconds = time.perf_counter() - t0
    model.save(out_dir)
    print(json.dumps({
        "quantize_seconds": seconds, "version": f"gptqmodel {gptqmodel.__version__}",
        "settings": {k: getattr(qcfg, k, None) for k in ("bits", "group_size", "desc_act", "act_group_aware", "sym", "damp_percent", "static_groups", "mse")},
    }, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
