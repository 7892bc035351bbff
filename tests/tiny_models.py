"""Tiny random models of every supported family, a tokenizer trained in-process and a small
corpus; imported by tests/conftest.py (fixtures) and by tests that build their own variants."""
from __future__ import annotations

import json

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

VOCAB = 512  # model vocabulary; the tokenizer uses fewer ids (<= TOKENIZER_VOCAB)
TOKENIZER_VOCAB = 400
HIDDEN, INTER, LAYERS, HEADS = 128, 256, 2, 4

_WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be "
    "river mountain city king queen war peace music science history language water stone light "
    "north south east west ancient modern small large early late first second new old "
    "built founded written known called named born died moved became remained"
).split()


def corpus(n_docs: int = 240, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(25, 45))]
        docs.append(f"Document {d}. " + " ".join(words).capitalize() + ".")
    return docs


# Whether each family's own tokenizer starts a text with BOS (Llama, Mistral and Gemma add <s> /
# <bos>, OPT adds </s>; Qwen2 and GPT-2 add nothing): what `family_tokenizer` reproduces.
ADDS_BOS = {"llama": True, "qwen2": False, "qwen3": False, "mistral": True, "gemma": True,
            "gemma2": True, "gemma3_text": True, "opt": True, "gpt2": False}


def make_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE with one special token, `</s>` (id 0), which is also BOS; with `add_bos`
    a post-processor puts it before every text, as the families that add BOS do."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=["</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus(60), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="</s>")


def family_tokenizer(family: str) -> PreTrainedTokenizerFast:
    return make_tokenizer(add_bos=ADDS_BOS[family])


def family_config(family: str, **kw):
    """A transformers config of `family`: hidden 128, intermediate 256, 2 layers, vocab 512."""
    import transformers as T

    common = dict(vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False)
    llama_like = dict(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, **common,
    )
    if family == "llama":
        cfg = T.LlamaConfig(**llama_like)
    elif family == "qwen2":
        cfg = T.Qwen2Config(**llama_like)
    elif family == "qwen3":
        cfg = T.Qwen3Config(head_dim=HIDDEN // HEADS, **llama_like)
    elif family == "mistral":
        cfg = T.MistralConfig(sliding_window=None, **llama_like)
    elif family == "gemma":
        cfg = T.GemmaConfig(head_dim=HIDDEN // HEADS, **llama_like)
    elif family == "gemma2":
        cfg = T.Gemma2Config(head_dim=HIDDEN // HEADS, sliding_window=16, **llama_like)
    elif family == "gemma3_text":
        # A sliding window shorter than the windows we feed, so the local layer really differs.
        cfg = T.Gemma3TextConfig(
            head_dim=HIDDEN // HEADS, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"], **llama_like,
        )
    elif family == "opt":
        cfg = T.OPTConfig(
            hidden_size=HIDDEN, ffn_dim=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            word_embed_proj_dim=HIDDEN, **common,
        )
    elif family == "gpt2":
        cfg = T.GPT2Config(
            n_embd=HIDDEN, n_inner=INTER, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB,
            n_positions=256, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        )
    else:
        raise KeyError(family)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def make_model(family: str, seed: int = 0, std: float = 0.1, **kw):
    """A random model of `family` whose weights are wide enough that 4-bit rounding shows.

    Default init (std 0.02) makes nearly flat logits; std 0.1 gives KL values that separate
    8-bit from 4-bit by orders of magnitude.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        family_config(family, **kw), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, std)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


def save_model(model, folder: Path, tokenizer=None) -> Path:
    model.save_pretrained(str(folder))
    (tokenizer or make_tokenizer()).save_pretrained(str(folder))
    return folder


FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gemma3_text", "opt", "gpt2")


def run_config(model: Path, text: Path, out: Path, **sections) -> dict:
    """A small config dict: RTN, seqlen 32, a few windows, no speed measurement. GPT-2's
    Conv1D layers are exported as GPTQ (compressed-tensors quantizes nn.Linear only)."""
    gpt2 = json.loads((Path(model) / "config.json").read_text()).get("model_type") == "gpt2"
    cfg = {
        "model": {"source": str(model), "dtype": "float32", "device": "cpu"},
        "calibration": {"dataset": str(text), "nsamples": 4, "seqlen": 32},
        "quantize": {"method": "rtn", "bits": 4, "group_size": 64},
        "export": {"output_dir": str(out), **({"format": "gptq"} if gpt2 else {})},
        "evaluate": {"dataset": str(text), "windows": 4, "seqlen": 32, "speed": False},
        # No plots/HTML: matplotlib costs seconds per run, and tests/report covers them.
        "report": {"print": False, "html": False},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def walk_logits(sm, ids: torch.Tensor, spool_dir: Path | None = None) -> torch.Tensor:
    """Logits ``[windows, L, V]`` of a `StreamedModel`, walked one block at a time."""
    with sm.embed(ids, spool_dir) as hidden:
        sm.walk(hidden, lambda i, block, stream: sm.run_block(block, i, stream), "logits")
        return torch.cat([sm.logits(hidden.read(w, w + 1), ids[w : w + 1]) for w in range(ids.shape[0])])


def transformers_logits(artifact: Path, ids: torch.Tensor, **load) -> torch.Tensor:
    """Logits of an artifact loaded by transformers itself (its quantizer for the format; `load`:
    e.g. `gguf_file`), one window at a time."""
    from transformers import AutoModelForCausalLM

    peer = AutoModelForCausalLM.from_pretrained(str(artifact), dtype=torch.float32, device_map="cpu", **load).eval()
    with torch.no_grad():
        return torch.cat([peer(ids[w : w + 1]).logits for w in range(ids.shape[0])])
