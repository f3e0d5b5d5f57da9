#!/usr/bin/env python3
"""Writes a random-weight LLaMA-shaped Hugging Face model directory (config.json, safetensors
shards of at most 4 GiB, model.safetensors.index.json), for running a model of a real size
through the example's `--model` and `--gpu-budget-gb` where none can be downloaded (the GPU
machine has PyTorch but no internet). Needs only torch.

    python3 scripts/make-hf-model.py --preset 7b --dtype bf16 /tmp/hf-7b

The weights are one 64 MiB block of N(0, 0.02) values repeated (norms are ones): fast to
write, and a model that runs, not one that says anything.
"""

import argparse
import json
import os
import struct

import torch

PRESETS = {
    # LLaMA-2-7B.
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    # Llama-3.2-1B-shaped, untied.
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    # For a quick check of this script.
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
}
DTYPES = {"bf16": (torch.bfloat16, "BF16", "bfloat16"), "f16": (torch.float16, "F16", "float16"),
          "f32": (torch.float32, "F32", "float32")}
SHARD_BYTES = 4 << 30


def tensors(c):
    """Every tensor of a LlamaForCausalLM, in order, with its shape."""
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", [v, h]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", [h]
        yield p + "self_attn.q_proj.weight", [q, h]
        yield p + "self_attn.k_proj.weight", [kv, h]
        yield p + "self_attn.v_proj.weight", [kv, h]
        yield p + "self_attn.o_proj.weight", [h, q]
        yield p + "post_attention_layernorm.weight", [h]
        yield p + "mlp.gate_proj.weight", [f, h]
        yield p + "mlp.up_proj.weight", [f, h]
        yield p + "mlp.down_proj.weight", [h, f]
    yield "model.norm.weight", [h]
    yield "lm_head.weight", [v, h]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--preset", default="7b", choices=PRESETS)
    ap.add_argument("--dtype", default="bf16", choices=DTYPES)
    args = ap.parse_args()
    dtype, st_dtype, name = DTYPES[args.dtype]
    size = torch.tensor([], dtype=dtype).element_size()
    c = dict(PRESETS[args.preset], architectures=["LlamaForCausalLM"], model_type="llama",
             hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=False, torch_dtype=name)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(c, f, indent=2)

    def raw(t):
        # numpy has no bfloat16: its bits as int16.
        return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()

    gen = torch.Generator().manual_seed(0)
    block = raw((torch.randn((64 << 20) // size, generator=gen) * 0.02).to(dtype))
    ones = raw(torch.ones(1 << 16, dtype=dtype))

    # Group the tensors into shards.
    shards, current, current_bytes = [], [], 0
    for tname, shape in tensors(c):
        n = 1
        for d in shape:
            n *= d
        nbytes = n * size
        if current and current_bytes + nbytes > SHARD_BYTES:
            shards.append(current)
            current, current_bytes = [], 0
        current.append((tname, shape, nbytes))
        current_bytes += nbytes
    shards.append(current)

    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for tname, shape, nbytes in shard:
            header[tname] = {"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[tname] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(args.out, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for tname, shape, nbytes in shard:
                src = ones if len(shape) == 1 else block
                left = nbytes
                while left:
                    chunk = src[: min(left, len(src))]
                    f.write(chunk)
                    left -= len(chunk)
        total += offset
        print(f"{fname}: {offset / 2**30:.2f} GiB, {len(shard)} tensors", flush=True)
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    print(f"{args.out}: {args.preset} in {args.dtype}, {total / 2**30:.2f} GiB in {len(shards)} shards")


if __name__ == "__main__":
    main()
