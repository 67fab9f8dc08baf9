"""Builds small random transformers.LlamaForCausalLM checkpoints for the tests."""

import torch
import transformers


def make_hf_llama(path, vocab_size=128, hidden_size=64, layers=2, heads=4, kv_heads=4, ffn=96, tied=False,
                  rope_scaling=None, seed=0, max_positions=256, bos=1, eos=2):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        rope_scaling=rope_scaling, tie_word_embeddings=tied, rms_norm_eps=1e-5, bos_token_id=bos,
        eos_token_id=eos, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger than the default init so that the logits are far from uniform
        for p in model.parameters():
            p.normal_(0.0, 0.15)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model
