"""A `tokenizer.json` (Hugging Face `tokenizers`) that encodes exactly as a SentencePiece BPE `tokenizer.model`.

The export writes it beside tokenizer.model, so AutoTokenizer, tokenizers-only tools (text-generation-inference,
llama.cpp's converter, the server of any language) and this project's own HFTokenizer give the same ids as the
SentencePiece model. SentencePiece BPE stores pieces and scores, not merges; BPE with merge ranks gives the
same segmentation when every two-piece split of a piece is a merge ranked by the piece's score (SentencePiece
merges, at each step, the adjacent pair whose union has the highest score), which is what `_merges` lists.
"""

from __future__ import annotations

import json

from llama_jax.errors import UserError

# sentencepiece_model.proto: ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class ConversionError(ValueError, UserError):
    """A SentencePiece model this converter cannot express as tokenizer.json (a unigram model)."""


def sentencepiece_to_json(model_bytes: bytes, add_bos: bool = True) -> str:
    """tokenizer.json text for a serialized SentencePiece BPE model. `add_bos`: the post-processor adds the BOS
    piece when special tokens are requested (AutoTokenizer's default), as generate.py and training do."""
    import tokenizers
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    if proto.trainer_spec.model_type != 2:  # TrainerSpec.ModelType.BPE
        raise ConversionError("only SentencePiece BPE models can be written as tokenizer.json (this one is not BPE)")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    unk = next(piece for piece, _, kind in pieces if kind == _UNKNOWN)
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=_merges(pieces, vocab), unk_token=unk, fuse_unk=True,
                                         byte_fallback=proto.trainer_spec.byte_fallback))
    spec = proto.normalizer_spec
    if spec.name not in ("identity", "") or spec.remove_extra_whitespaces:
        raise ConversionError(f"the SentencePiece normalization {spec.name!r} (with extra-whitespace removal "
                              f"{spec.remove_extra_whitespaces}) has no tokenizer.json equivalent here")
    steps = [normalizers.Prepend("▁")] if spec.add_dummy_prefix else []
    tk.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    # SentencePiece cuts the text into words before merging: a run of "▁" begins a word (the whole run, when
    # whitespace-only pieces are allowed; otherwise each "▁") and the characters up to the next "▁" end it.
    if proto.trainer_spec.split_by_whitespace:
        word = "▁+[^▁]*|[^▁]+" if proto.trainer_spec.allow_whitespace_only_pieces else "▁[^▁]*|[^▁]+"
        tk.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(word), behavior="isolated")
    strip = [decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else []
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    # Control pieces (<s>, </s>, <pad>) never come out of plain text in SentencePiece, but transformers' Llama
    # tokenizers treat them as special tokens; user-defined pieces (the chat markers) are matched in any text.
    tk.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, kind in pieces
                           if kind in (_CONTROL, _UNKNOWN)])
    tk.add_tokens([AddedToken(p, special=False, normalized=False) for p, _, kind in pieces if kind == _USER_DEFINED])
    bos = pieces[proto.trainer_spec.bos_id][0] if add_bos and proto.trainer_spec.bos_id >= 0 else None
    if bos is not None:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, proto.trainer_spec.bos_id)])
    return json.dumps(json.loads(tk.to_str()), ensure_ascii=False, indent=2)


def _merges(pieces, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a learned piece into two pieces, ranked by the piece's score (ties: by the parts' ids)."""
    merges = []
    for piece, score, kind in pieces:
        if kind != _NORMAL or len(piece) < 2:
            continue
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[piece], vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]
