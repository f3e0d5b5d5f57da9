#!/usr/bin/env python3
"""Builds the Hugging Face checkpoint fixtures under tests/fixtures/hf/.

Each fixture is a tiny random-weight LLaMA-family model saved with transformers'
`save_pretrained` (safetensors), plus `reference.json`: two prompts, the greedy
continuation transformers generates for them (PyTorch on the CPU, f32, eager attention,
the whole sequence recomputed each step) and the logits behind every generated token.
The Rust test `tests/hf_checkpoints.rs` loads each directory through the example's loader
and compares.

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install -r scripts/hf-fixtures.requirements.txt
    /tmp/hf/bin/python scripts/hf-fixtures.py            # rewrites tests/fixtures/hf/

The fixtures (well under 1 MB each) are committed, so CI needs no PyTorch.
"""

import json
import math
import pathlib
import shutil

import safetensors
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf"
NEW_TOKENS = 8
PROMPT_LEN = 8
# The greedy token must win by this much at every step, so that the Rust side's float
# differences (about 1e-6) cannot flip it.
MIN_MARGIN = 1e-2

CORPUS = """\
The quick brown fox jumps over the lazy dog. A model bigger than the card runs at the speed of
the bus: its weights live in pinned host memory, and the kernels read them over PCIe. Burn is a
deep learning framework written in Rust; a backend decorator wraps another backend and adds
behaviour, as Autodiff adds gradients. The tokenizer splits text into bytes, then merges the
most frequent pairs. Offloading moves parameters to the host; prefetching copies them back
ahead of use, one layer at a time, while the previous layer computes.
"""


def train_tokenizer(vocab_size):
    """A byte-level BPE tokenizer trained on CORPUS (as GPT-2 and Llama 3 use)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    assert tok.get_vocab_size() <= vocab_size, tok.get_vocab_size()
    return tok


def randomize(model, seed):
    """Weights of order one (transformers' 0.02 init gives logits too flat for greedy
    decoding to be a meaningful check): N(0, 1/fan_in) matrices, embeddings of std 0.1 (so that the layers, not the
    token itself, decide the next token), norms
    around 1, small biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


def greedy(model, prompts):
    """Greedy continuation with the whole sequence recomputed each step."""
    ids = torch.tensor(prompts, dtype=torch.long)
    tokens, logits, margin = [], [], math.inf
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            last = model(input_ids=ids).logits[:, -1, :].float()
            top = torch.topk(last, 2, dim=-1).values
            margin = min(margin, float((top[:, 0] - top[:, 1]).min()))
            nxt = last.argmax(dim=-1)
            tokens.append(nxt.tolist())
            logits.append(last.tolist())
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    batch = len(prompts)
    return (
        [[step[b] for step in tokens] for b in range(batch)],
        [[step[b] for step in logits] for b in range(batch)],
        margin,
    )


def prompts_for(vocab, seed):
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, vocab, (2, PROMPT_LEN), generator=gen).tolist()


def legacy_rope(cfg):
    """Hub checkpoints of the Llama 3.1 era say `rope_theta` + `rope_scaling`; transformers 5
    writes `rope_parameters`."""
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    if params.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = params


def build(name, config_cls, model_cls, config, dtype, shard=None, tokenizer=None, edit=None):
    """`edit(config_dict)` changes the saved config.json before the reference is computed from
    the directory, so that the reference is what transformers makes of the edited file."""
    out = ROOT / name
    shutil.rmtree(out, ignore_errors=True)
    for seed in range(100):
        torch.manual_seed(seed)
        model = model_cls(config_cls(**config, attn_implementation="eager")).eval()
        randomize(model, seed)
        shutil.rmtree(out, ignore_errors=True)
        model.to(dtype).save_pretrained(out, max_shard_size=shard or "50GB")
        if edit is not None:
            cfg_path = out / "config.json"
            cfg = json.loads(cfg_path.read_text())
            edit(cfg)
            cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        # The reference is what transformers computes in f32 from the directory as saved
        # (f16/bf16 weights upcast exactly; the rotary frequencies computed afresh in f32).
        reloaded = model_cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
        if tokenizer is not None:
            prompt_texts = ["The quick brown fox", "Offloading moves the"]
            enc = [tokenizer.encode(t).ids for t in prompt_texts]
            n = min(len(e) for e in enc)
            prompts = [e[:n] for e in enc]
        else:
            prompt_texts = None
            prompts = prompts_for(config["vocab_size"], seed)
        tokens, logits, margin = greedy(reloaded.eval(), prompts)
        if margin >= MIN_MARGIN:
            break
    else:
        raise SystemExit(f"{name}: no seed gave greedy margins >= {MIN_MARGIN}")

    record = {
        "model": name,
        "made_with": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
        },
        "stored_dtype": str(dtype).removeprefix("torch."),
        "seed": seed,
        "min_greedy_margin": margin,
        "prompts": prompts,
        "tokens": tokens,
        "logits": logits,
    }
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
        record["prompt_texts"] = prompt_texts
        record["completion_texts"] = [tokenizer.decode(t) for t in tokens]
    (out / "reference.json").write_text(json.dumps(record) + "\n")
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"{name}: {size / 1024:.0f} KiB, seed {seed}, margin {margin:.3f}, files {files}")


def main():
    torch.set_num_threads(1)
    tok = train_tokenizer(300)
    small = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
    )
    # Llama 3.1-style: GQA, llama3 rope scaling, an explicit head_dim that is not
    # hidden/heads, a tied head, a tokenizer; f32, one file, the older rope config form.
    build(
        "llama3-tied",
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            small,
            vocab_size=tok.get_vocab_size(),
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
        torch.float32,
        tokenizer=tok,
        edit=legacy_rope,
    )
    # Llama 2-style: multi-head attention, an untied head; f16, sharded.
    build(
        "llama2-sharded-f16",
        LlamaConfig,
        LlamaForCausalLM,
        dict(small, vocab_size=128, num_key_value_heads=4, intermediate_size=80,
             tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        torch.float16,
        shard="20KB",
    )
    # Mistral: one kv head, a sliding window shorter than prompt + continuation; bf16.
    build(
        "mistral-bf16",
        MistralConfig,
        MistralForCausalLM,
        dict(small, vocab_size=128, num_key_value_heads=1, sliding_window=6,
             tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        torch.bfloat16,
    )
    # Llama with every bias (`attention_bias`: q/k/v/o, `mlp_bias`), linear rope scaling, and
    # no `rms_norm_eps` in config.json (transformers' default, 1e-6, applies).
    build(
        "llama-biases-linear",
        LlamaConfig,
        LlamaForCausalLM,
        dict(small, vocab_size=128, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
             tie_word_embeddings=False,
             rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0)),
        torch.float32,
        edit=lambda cfg: cfg.pop("rms_norm_eps"),
    )
    # Qwen2: q/k/v biases.
    build(
        "qwen2",
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(small, vocab_size=128, num_key_value_heads=2, tie_word_embeddings=False,
             use_sliding_window=False, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
        torch.float32,
    )


if __name__ == "__main__":
    main()
