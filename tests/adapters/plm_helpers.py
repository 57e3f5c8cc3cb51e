"""A tiny randomly initialised Llama with SmolLM2's tokenizer and chat template, saved as a
Hugging Face folder: the personal-model mechanics (training, gate, registry, serving) run on
it in seconds. Quality claims are tested on the real SmolLM2 or measured by the benchmark."""

from __future__ import annotations

from pathlib import Path


def tiny_llama_folder(folder: Path, model_cache: Path) -> Path:
    """Writes the tiny model (about 3.3M parameters, mostly the embedding) into `folder`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from adapters.plm.model import BaseSpec, base_folder

    tokenizer = AutoTokenizer.from_pretrained(base_folder(BaseSpec(cache_dir=Path(model_cache))),
                                              local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # unit-norm-ish embeddings: logits can peak, so a small adapter can teach
        model.model.embed_tokens.weight.normal_(0.0, 0.3)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
