"""python -m llama_jax.tokenizer (llama-jax-tokenizer): train a SentencePiece tokenizer on text files.

    python -m llama_jax.tokenizer train --input corpus/*.txt --vocab-size 4096 --out tok/tokenizer.model
"""

from __future__ import annotations

from llama_jax.cli.common import ArgumentParser, fail
from llama_jax.errors import UserError


def main(argv=None):
    parser = ArgumentParser(prog="python -m llama_jax.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a SentencePiece model on text files")
    train.add_argument("--input", nargs="+", required=True, help="files, directories or globs (.txt, .jsonl, .gz)")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="path of the tokenizer.model to write")
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    train.add_argument("--text-field", default="text", help="field holding the text in .jsonl files")
    args = parser.parse_args(argv)

    from llama_jax.data.corpus import iter_documents
    from llama_jax.text.tokenizer import train_tokenizer

    try:
        tok = train_tokenizer((text for _, text in iter_documents(args.input, text_field=args.text_field)),
                              args.vocab_size, args.out, args.model_type)
    except UserError as e:
        return fail(str(e))
    print(f"wrote {args.out} (vocab size {tok.vocab_size})")
    return 0
