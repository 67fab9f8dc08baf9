"""llama2.c checkpoints: real trained weights against llama2.c's own C implementation, and random models written
in both published layouts against transformers."""

import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llama_jax as lj
from llama_jax.checkpoints.llama2c import MAGIC, Llama2cError, load_llama2c
from llama_jax.cli import hf as hf_cli
from tests.hf_util import make_hf_llama

REFDATA = Path(__file__).resolve().parent / "data"  # real trained weights and run.c's output (see its README)


def test_stories260k_greedy_ids_equal_llama2c_run_c():
    path = REFDATA / "stories260K.bin"
    config, params = load_llama2c(path)
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.vocab_size) == (64, 5, 8, 4, 512)
    text = (REFDATA / "stories260K.runc-ids.txt").read_text()
    expected = [int(t) for line in text.splitlines() if not line.startswith("#") for t in line.split()]
    assert len(expected) == 200
    assert lj.generate(params, config, [[1]], max_new_tokens=200, temperature=0.0)[0] == expected


def halves_to_interleaved(w, n_heads):
    """Hugging Face's q/k rows (split halves per head) back to Meta's interleaved pairs: the inverse of the
    permutation the reader applies, written here from its definition."""
    out, d_in = w.shape
    H = out // n_heads
    return w.reshape(n_heads, 2, H // 2, d_in).transpose(0, 2, 1, 3).reshape(out, d_in)


def write_llama2c(model, path, version):
    """A transformers Llama written as llama2.c's export.py writes it (legacy_export / version1_export)."""
    c = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    L = c.num_hidden_layers
    layer = lambda name: [sd[f"model.layers.{i}.{name}.weight"] for i in range(L)]
    wq = [halves_to_interleaved(w, c.num_attention_heads) for w in layer("self_attn.q_proj")]
    wk = [halves_to_interleaved(w, c.num_key_value_heads) for w in layer("self_attn.k_proj")]
    shared = c.tie_word_embeddings
    dims = [c.hidden_size, c.intermediate_size, L, c.num_attention_heads, c.num_key_value_heads, c.vocab_size,
            c.max_position_embeddings]
    with open(path, "wb") as f:
        if version == 0:
            dims[5] = dims[5] if shared else -dims[5]
            f.write(struct.pack("<7i", *dims))
            H = c.hidden_size // c.num_attention_heads
            angles = np.outer(np.arange(c.max_position_embeddings), 1.0 / 10000 ** (np.arange(0, H, 2) / H))
            tensors = [sd["model.embed_tokens.weight"], *layer("input_layernorm"), *wq, *wk,
                       *layer("self_attn.v_proj"), *layer("self_attn.o_proj"), *layer("post_attention_layernorm"),
                       *layer("mlp.gate_proj"), *layer("mlp.down_proj"), *layer("mlp.up_proj"),
                       sd["model.norm.weight"], np.cos(angles), np.sin(angles)]
        else:
            header = struct.pack("<Ii", MAGIC, 1) + struct.pack("<7i", *dims) + struct.pack("B", int(shared))
            f.write(header + b"\0" * (256 - len(header)))
            tensors = [*layer("input_layernorm"), *layer("post_attention_layernorm"), sd["model.norm.weight"],
                       sd["model.embed_tokens.weight"], *wq, *wk, *layer("self_attn.v_proj"),
                       *layer("self_attn.o_proj"), *layer("mlp.gate_proj"), *layer("mlp.down_proj"),
                       *layer("mlp.up_proj")]
        if not shared:
            tensors.append(sd["lm_head.weight"])
        for t in tensors:
            f.write(np.ascontiguousarray(t, "<f4").tobytes())


@pytest.mark.parametrize("version, tied", [(0, True), (0, False), (1, True), (1, False)])
def test_both_layouts_give_transformers_logits(tmp_path, version, tied):
    model = make_hf_llama(tmp_path / "hf", vocab_size=96, hidden_size=64, layers=2, heads=4, kv_heads=2, ffn=80,
                          tied=tied, max_positions=64)
    write_llama2c(model, tmp_path / "m.bin", version)
    config, params = load_llama2c(tmp_path / "m.bin")
    assert config.tie_embeddings == tied and ("lm_head" in params) != tied
    tokens = np.random.default_rng(0).integers(0, 96, (2, 20))
    ours = np.asarray(lj.forward(params, jnp.asarray(tokens, jnp.int32), config))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_unsupported_and_damaged_files_get_one_line(tmp_path):
    (tmp_path / "q.bin").write_bytes(struct.pack("<Ii", MAGIC, 2) + b"\0" * 300)
    with pytest.raises(Llama2cError, match="version 2 is not supported .*int8-quantized"):
        load_llama2c(tmp_path / "q.bin")
    (tmp_path / "text.bin").write_bytes(b"hello, this is not a checkpoint at all...")
    with pytest.raises(Llama2cError, match="not a llama2.c checkpoint"):
        load_llama2c(tmp_path / "text.bin")
    model = make_hf_llama(tmp_path / "hf", vocab_size=96, hidden_size=64, layers=1, heads=4, ffn=80)
    write_llama2c(model, tmp_path / "m.bin", 1)
    raw = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "m.bin").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(Llama2cError, match="truncated"):
        load_llama2c(tmp_path / "m.bin")


def test_generate_py_and_import_read_a_llama2c_file(tmp_path, capsys):
    from llama_jax.cli import generate as generate_cli
    from llama_jax.text.tokenizer import train_tokenizer

    text = "once upon a time there was a little fox who liked to run in the green forest. " * 40
    tok = train_tokenizer([text], 300, tmp_path / "tok" / "tokenizer.model")
    model = make_hf_llama(tmp_path / "hf", vocab_size=320, hidden_size=64, layers=2, heads=4, kv_heads=2, ffn=80,
                          max_positions=64)
    write_llama2c(model, tmp_path / "stories.bin", 1)
    config, params = load_llama2c(tmp_path / "stories.bin")
    prompt = tok.encode("once upon", bos=True)
    new = lj.generate(params, config, [prompt], max_new_tokens=10, temperature=0.0, stop_tokens=(tok.eos_id,))[0]
    expected = "once upon" + tok.decode([t for t in new if t != tok.eos_id])
    argv = ["--prompt", "once upon", "--temperature", "0", "--max-new-tokens", "10"]
    capsys.readouterr()
    assert generate_cli.main(["--checkpoint", str(tmp_path / "stories.bin"), "--tokenizer",
                              str(tmp_path / "tok" / "tokenizer.model"), *argv]) == 0
    assert capsys.readouterr().out.rstrip("\n") == expected
    # Without --tokenizer and none beside the file: one line saying so.
    assert generate_cli.main(["--checkpoint", str(tmp_path / "stories.bin"), *argv]) == 2
    assert "no tokenizer.json or tokenizer.model beside the checkpoint" in capsys.readouterr().err
    # Imported into a run directory, it samples the same.
    assert hf_cli.main(["import", "--checkpoint", str(tmp_path / "stories.bin"), "--tokenizer",
                    str(tmp_path / "tok" / "tokenizer.model"), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert generate_cli.main(["--checkpoint", str(tmp_path / "run"), *argv]) == 0
    assert capsys.readouterr().out.rstrip("\n") == expected
    # --init-from takes it too, its tokenizer named by --data.tokenizer (or found beside the file).
    from llama_jax.cli import train as train_cli
    from llama_jax.config import load_run_config
    from llama_jax.train import loop

    init = ["train.init_from=" + str(tmp_path / "stories.bin")]
    assert train_cli.main(["--run-dir", str(tmp_path / "ft"), "--init-from", str(tmp_path / "stories.bin")]) == 2
    assert "(name one with data.tokenizer)" in capsys.readouterr().err
    assert not (tmp_path / "ft" / "config.yaml").exists()
    run_config = load_run_config(None, [*init, "data.tokenizer=" + str(tmp_path / "tok" / "tokenizer.model")])
    init_tok, init_config, init_params = loop._init_weights(run_config)
    assert init_tok.files == tok.files and init_config.replace(dtype=config.dtype) == config
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init_params), jax.tree.leaves(params)))
