"""python -m llama_jax.hf (llama-jax-hf): export a training run as a Hugging Face Llama directory, or import one
(or a llama2.c file) as a run directory."""

from __future__ import annotations

import sys
from pathlib import Path

from llama_jax.checkpoints import run_dir
from llama_jax.checkpoints.hf import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from llama_jax.checkpoints.load import checkpoint_kind, load_checkpoint
from llama_jax.checkpoints.peft import save_peft_adapter
from llama_jax.cli.common import ArgumentParser, fail, quiet_library_noise
from llama_jax.errors import UserError


def main(argv=None) -> int:
    """python -m llama_jax.hf export --checkpoint RUN_DIR --out HF_DIR [--overwrite] [--merge] [--adapter PEFT_DIR]
    python -m llama_jax.hf import --checkpoint HF_DIR --out RUN_DIR"""
    quiet_library_noise()
    p = ArgumentParser(prog="python -m llama_jax.hf", description="Convert to and from Hugging Face Llama.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="a training run's checkpoint or a GGUF file -> a Hugging Face Llama directory")
    e.add_argument("--checkpoint", required=True, help="a training run directory or a GGUF file")
    e.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    e.add_argument("--out", required=True, help="directory to write (new or empty, unless --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    e.add_argument("--max-shard-gb", type=float, default=2.0)
    e.add_argument("--merge", action="store_true",
                   help="a LoRA run (or --adapter): write the full model with the adapters merged, instead of a "
                        "PEFT adapter directory")
    e.add_argument("--adapter", help="a PEFT LoRA adapter directory to apply to --checkpoint (any kind, a Hugging "
                                     "Face directory included); exported as a PEFT adapter again unless --merge")
    i = sub.add_parser("import", help="a Hugging Face Llama directory -> a run directory (Orbax checkpoint)")
    i.add_argument("--checkpoint", required=True,
                   help="a Hugging Face Llama directory, a GGUF file or a llama2.c .bin file")
    i.add_argument("--tokenizer", help="SentencePiece tokenizer.model (default: the one beside the checkpoint)")
    i.add_argument("--out", required=True, help="run directory to create")
    try:
        args = p.parse_args(argv)
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else 2

    from llama_jax.checkpoints.llama2c import load_llama2c
    from llama_jax.data.corpus import LoaderState
    from llama_jax.text.tokenizer import load_tokenizer

    try:
        src, out = Path(args.checkpoint), Path(args.out)
        kind = checkpoint_kind(src)
        if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
            raise CheckpointError(f"--out {out}: inside the --checkpoint directory {src}; choose a directory outside")
        if args.command == "export":
            if kind == "hf" and not args.adapter:
                raise CheckpointError(f"--checkpoint {src}: export reads a training run directory or a GGUF file; "
                                      "this one is a Hugging Face directory already")
            if not args.max_shard_gb > 0:
                raise CheckpointError(f"--max-shard-gb={args.max_shard_gb} must be > 0")
            _check_export_target(out, args.overwrite)
            ckpt = load_checkpoint(src, args.step, adapter=args.adapter)
            if args.merge and ckpt.adapter is None:
                raise CheckpointError(f"--merge: {src} has no adapters to merge (a LoRA run directory, or --adapter)")
            if args.overwrite:
                _remove_export(out)
            if ckpt.adapter is not None and not args.merge:
                out = save_peft_adapter(out, ckpt.adapter.adapters, ckpt.adapter.lora, ckpt.adapter.base)
                print(f"a PEFT adapter (rank {ckpt.adapter.lora.rank}) of {ckpt.adapter.base}; --merge writes the "
                      "full model instead", file=sys.stderr)
            else:
                out = save_hf_checkpoint(out, ckpt.config, ckpt.params, ckpt.tokenizer,
                                         int(args.max_shard_gb * (1 << 30)), chat_template=ckpt.chat_template,
                                         stop_tokens=ckpt.stop_tokens)
        else:
            if kind == "run":
                raise CheckpointError(f"--checkpoint {src}: import reads a Hugging Face directory (config.json, "
                                      "*.safetensors), a GGUF file or a llama2.c .bin file; this one is a training "
                                      "run directory already")
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise CheckpointError(f"--out {out}: exists and is not an empty directory; choose a new one")
            if kind == "gguf":  # the file carries its tokenizer
                ckpt = load_checkpoint(src, tokenizer=args.tokenizer)
                config, params, tok = ckpt.config, ckpt.params, ckpt.tokenizer
            else:
                tok_path = Path(args.tokenizer) if args.tokenizer else src.parent if kind == "llama2c" else src
                if not (tok_path.is_file() or (tok_path / "tokenizer.json").is_file()
                        or (tok_path / "tokenizer.model").is_file()):
                    raise CheckpointError(f"{tok_path}: no tokenizer.json or tokenizer.model (name one with "
                                          "--tokenizer)")
                tok = load_tokenizer(tok_path)
                config, params = load_llama2c(src) if kind == "llama2c" else load_hf_checkpoint(src)
            if tok.vocab_size > config.vocab_size:
                raise CheckpointError(f"{tok.model_file}: {tok.vocab_size} tokens, more than the model's vocabulary "
                                      f"{config.vocab_size}")
            out = run_dir.save_imported(out, config, params, tok, LoaderState(seed=0).to_dict())
    except UserError as err:
        return fail(str(err))
    print(f"wrote {out}")
    sys.stdout.flush()
    return 0


_EXPORT_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "model.safetensors",
                 "model.safetensors.index.json", "adapter_config.json", "adapter_model.safetensors")


def _is_export_file(p: Path) -> bool:
    return p.name in _EXPORT_FILES or (p.name.startswith("model-") and p.name.endswith(".safetensors"))


def _check_export_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out}: exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise CheckpointError(f"--out {out}: not empty; pass --overwrite to replace the export there, or choose "
                              "another directory")
    others = sorted(p.name for p in out.iterdir() if not _is_export_file(p))
    if others:
        raise CheckpointError(f"--out {out}: holds files that are not part of an export ({', '.join(others[:3])}); "
                              "--overwrite only replaces an earlier export")


def _remove_export(out: Path) -> None:
    """Removes an earlier export's files, so no stale shard or index survives beside the new one."""
    if out.is_dir():
        for p in out.iterdir():
            if _is_export_file(p):
                p.unlink()
