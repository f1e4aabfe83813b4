"""Runs one forward of llama.cpp (llama-cpp-python) on a GGUF base with an optional GGUF LoRA, in its own process.

`python run_llama.py BASE.gguf LORA.gguf|- IDS OUT.npy`: IDS is a comma-separated list of token ids; OUT gets the
logits of every position, float32 [n, vocab]. A separate process because llama-cpp-python 0.3.36 does not stop on
every failed adapter load, and the first eval after one can crash the interpreter: the caller sees an exit status and
this script's stderr, never a crashed test session. Exit 3: the adapter did not load.
"""

from __future__ import annotations

import sys

import numpy as np


def main(argv: list[str]) -> int:
    import llama_cpp

    base, lora, ids, out = argv
    tokens = [int(t) for t in ids.split(",")]
    f32 = llama_cpp.GGML_TYPE_F32
    try:
        llm = llama_cpp.Llama(
            model_path=base,
            lora_path=None if lora == "-" else lora,
            logits_all=True,
            n_ctx=64,
            n_batch=64,
            n_threads=1,
            type_k=f32,  # the KV cache in f32: f16 keys/values alone differ from PEFT by ~1e-4
            type_v=f32,
            seed=0,
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        print(f"llama.cpp refused the model or adapter: {exc}", file=sys.stderr)
        return 3
    if lora != "-" and not llm._lora_adapter:  # a NULL handle: the adapter did not load
        print(f"llama.cpp did not load the adapter {lora}", file=sys.stderr)
        return 3
    llm.eval(tokens)
    np.save(out, np.array(llm.scores[: len(tokens)], dtype=np.float32))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
