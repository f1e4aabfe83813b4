"""Writes examples/tiny-llama: a PEFT LoRA adapter on a tiny random Llama, and that model's config as the base.

Run with transformers 5.23.0 and peft 0.21.2 (the fixture environment, tests/fixtures/README.md):
`python examples/tiny-llama/make_example.py`. Fixed seeds: the same files on every run with those versions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: llama.cpp permutes q and k rows with different head counts
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # random B as well as A: a delta that is not zero, as after training
    )
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(HERE / "adapter")
    (HERE / "adapter" / "README.md").unlink()  # PEFT's model-card template: nothing about this adapter
    (HERE / "adapter" / "adapter_model.safetensors").chmod(0o644)
    (HERE / "base").mkdir(exist_ok=True)
    config.save_pretrained(HERE / "base")


if __name__ == "__main__":
    main()
