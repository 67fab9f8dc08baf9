"""The command behind `generate.py`: load a checkpoint and its tokenizer, stream text, or chat."""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from pathlib import Path

import jax

from llama_jax.checkpoints.load import load_checkpoint
from llama_jax.cli import common as cli
from llama_jax.cli.common import (
    ADAPTER_HELP,
    CHECKPOINT_HELP,
    USER_ERROR,
    ArgumentParser,
    fail,
    quiet_library_noise,
    stopped,
)
from llama_jax.decode import generate, stream
from llama_jax.errors import ArgumentError, UserError
from llama_jax.sampling import check_sampling_args
from llama_jax.text import chat_template as chat
from llama_jax.text.tokenizer import TextStream as Detokenizer


class UsageError(ValueError, UserError):
    """A flag of generate.py out of range or in a combination that cannot work."""


def parse_args(argv=None):
    p = ArgumentParser(prog="generate.py", description="Sample text from a checkpoint.")
    p.add_argument("--checkpoint", required=True,
                   help=CHECKPOINT_HELP)
    p.add_argument("--tokenizer", help="the SentencePiece tokenizer.model to use (default: the checkpoint's own, or "
                                       "tokenizer.model beside it)")
    p.add_argument("--step", type=int, help="which checkpoint step of a run directory (default: the newest)")
    p.add_argument("--adapter", help=ADAPTER_HELP)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", action="append", default=[], help="a file whose whole text is one prompt")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, help="keep the most likely tokens whose probabilities sum to p")
    p.add_argument("--min-p", type=float, help="keep tokens at least min-p times as likely as the most likely one")
    p.add_argument("--repetition-penalty", type=float, help="divide the logits of tokens already seen (CTRL)")
    p.add_argument("--seed", type=int, help="the random seed of sampling (default: a new one each run, printed so "
                                            "that the sample can be drawn again)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype (default: float32 on a CPU, the checkpoint's elsewhere)")
    p.add_argument("--show-probs", type=int, metavar="K",
                   help="after the text, list for each generated token the K most likely candidates with their "
                        "probabilities after temperature and the filters (and which filter cut the others)")
    p.add_argument("--chat", action="store_true",
                   help="interactive multi-turn chat with the checkpoint's chat template (docs/generate.md)")
    p.add_argument("--system", help="system message for --chat")
    return p.parse_args(argv)


def check_args(args) -> list[str]:
    """Checks the flags that need no checkpoint and reads the prompt files: everything that can fail is checked
    before anything is loaded or printed. Returns the prompt texts."""
    if args.num_samples < 1:
        raise UsageError(f"--num-samples={args.num_samples} must be >= 1")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)
    except ArgumentError as e:  # named as the library names it (top_k=0); the user typed --top-k
        raise UsageError("--" + str(e).replace(e.param, e.param.replace("_", "-"), 1)) from None
    if args.show_probs is not None and (args.show_probs < 1 or args.chat or len(args.prompt) + len(args.prompt_file)
                                        > 1 or args.num_samples != 1):
        raise UsageError("--show-probs K needs K >= 1 and one prompt (no --chat, --num-samples or second prompt)")
    if args.chat and (args.prompt or args.prompt_file or args.num_samples != 1):
        raise UsageError("--chat reads its prompts interactively; leave out --prompt, --prompt-file and "
                         "--num-samples")
    texts = list(args.prompt)
    for f in args.prompt_file:
        try:
            texts.append(Path(f).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"--prompt-file {f}: no such file") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompt-file {f}: invalid UTF-8 at byte offset {e.start}") from None
        except OSError as e:
            raise UsageError(f"--prompt-file {f}: {e.strerror}") from None
    return texts


class TextStream:
    """Prints tokens as UTF-8 text as it becomes complete (text.tokenizer.TextStream: a character split over byte
    pieces is printed only when its last byte arrives)."""

    def __init__(self, tok, out=None, context=()):
        self.text, self.out = Detokenizer(tok, context), out or sys.stdout

    def write(self, token: int) -> str:
        text = self.text.add(token)
        self.out.write(text)
        self.out.flush()
        return text

    def close(self) -> None:
        self.out.write(self.text.flush())
        self.out.flush()


def _summary(n_prompt: int, prefill_s: float, n_new: int, decode_s: float) -> str:
    rate = lambda n, s: f"{n / s:.1f} tok/s" if s > 0 else "n/a"
    return (f"prefill: {n_prompt} tokens in {prefill_s:.2f}s ({rate(n_prompt, prefill_s)}, includes compilation); "
            f"decode: {n_new} tokens in {decode_s:.2f}s ({rate(n_new, decode_s)}, after the compiling first step)")


def _decode_dtype(checkpoint_dtype: str, requested: str | None) -> str:
    """The compute dtype to decode in. On a CPU a bfloat16 checkpoint decodes in float32 unless asked otherwise:
    XLA:CPU has no bfloat16 matrix-vector kernels, so it converts each step's weights (and KV cache) to float32,
    and streamed decoding ran slower than in float32 (docs/benchmarks-log.md). The parameters are float32 either
    way (training keeps float32 master weights)."""
    if requested:
        return requested
    if checkpoint_dtype == "float32" or jax.default_backend() != "cpu":
        return checkpoint_dtype
    print(f"note: the checkpoint computes in {checkpoint_dtype}; decoding in float32, which is faster on a CPU "
          f"(--dtype {checkpoint_dtype} to keep it)", file=sys.stderr)
    return "float32"


def run(args) -> None:
    texts = check_args(args)
    ckpt = load_checkpoint(args.checkpoint, args.step, args.tokenizer, adapter=args.adapter)
    config, params, tok = ckpt.config, ckpt.params, ckpt.tokenizer
    config = config.replace(dtype=_decode_dtype(config.dtype, args.dtype))
    seed = secrets.randbelow(1 << 31) if args.seed is None else args.seed
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, seed=seed, repetition_penalty=args.repetition_penalty)
    if args.chat:
        if ckpt.chat_template is None:
            raise UsageError(f"--chat: {args.checkpoint} has no chat template (a base model); generate from a "
                             "prompt instead")
        _say_seed(args, seed)
        return chat_loop(params, config, tok, sampling, args.system, template=ckpt.chat_template,
                         stops=ckpt.stop_tokens)
    if not texts:
        texts = [""]  # unconditional: BOS alone
    prompts = [tok.encode(t, bos=True) for t in texts for _ in range(args.num_samples)]
    if any(not p for p in prompts):
        raise UsageError("an empty prompt, and the tokenizer adds no BOS token to start from: give a --prompt")
    longest = max(len(p) for p in prompts)
    if longest + args.max_new_tokens > config.max_seq_len:
        raise UsageError(f"the prompt ({longest} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds the "
                         f"model's context of {config.max_seq_len} tokens")
    stops = ckpt.stop_tokens
    _say_seed(args, seed)  # every check has passed: the run samples now
    if len(prompts) == 1:
        new = _stream_one(params, config, tok, prompts[0], texts[0], stops, sampling)
        if args.show_probs:
            _show_probs(params, config, tok, prompts[0], new, args.show_probs, sampling)
        return
    t0 = time.perf_counter()
    outs = generate(params, config, prompts, stop_tokens=stops, **sampling)
    elapsed = time.perf_counter() - t0
    for i, (prompt_text, new) in enumerate(zip([t for t in texts for _ in range(args.num_samples)], outs)):
        body = tok.decode([t for t in new if t not in stops])
        print(f"--- sample {i + 1} (prompt {i // args.num_samples + 1}) ---\n{prompt_text}{body}")
    n_new = sum(len(o) for o in outs)
    print(f"{len(prompts)} rows, {n_new} new tokens in {elapsed:.2f}s ({n_new / elapsed:.1f} tok/s, "
          "including compilation)", file=sys.stderr)


def _say_seed(args, seed: int) -> None:
    """A seed drawn for this run is printed, so that the sample can be drawn again (greedy decoding draws none)."""
    if args.seed is None and args.temperature > 0:
        print(f"seed: {seed} (--seed {seed} draws this sample again)", file=sys.stderr)


def _stream_one(params, config, tok, prompt, prompt_text, stops, sampling) -> None:
    tokens = stream(params, config, [prompt], stop_tokens=stops, **sampling)  # checks its arguments now
    print(prompt_text, end="", flush=True)
    out = TextStream(tok, context=prompt[-1:])
    times = [time.perf_counter()]  # start, then the arrival of each token
    new = []
    for token in tokens:
        token = int(token[0])
        times.append(time.perf_counter())
        if token >= 0:
            new.append(token)
        if token < 0 or token in stops:
            break
        out.write(token)
    out.close()
    print()
    # The first token comes from the prefill and the second from the first (compiling) decode step: the decode
    # rate counts the steps after those.
    n_decode = max(len(times) - 3, 0)
    print(_summary(len(prompt), times[1] - times[0], n_decode, times[-1] - times[2] if n_decode else 0.0),
          file=sys.stderr)
    return new


def _show_probs(params, config, tok, prompt, new, k, sampling) -> None:
    """The distribution each token was drawn from (score.sampling_candidates), as a table after the text."""
    from llama_jax.score import sampling_candidates

    settings = {name: sampling[name] for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")}
    rows = sampling_candidates(params, config, prompt + new, len(prompt), k, **settings)
    shown = ", ".join(f"{n.replace('_', '-')} {v}" for n, v in settings.items() if v is not None)
    print(f"--- the {k} most likely candidates per token ({shown}): probability after the filters, [before] ---")
    piece = lambda i: repr(tok.decode([i]) if 0 <= i < tok.vocab_size and not tok.is_special(i) else tok.piece(i)
                           if 0 <= i < tok.vocab_size else f"<id {i}>")
    for n, row in enumerate(rows, 1):
        print(f"{n:>4} {piece(row['token'])}")
        for i, after, before, cut in row["candidates"]:
            mark = "<- chosen" if i == row["token"] else f"cut by {cut}" if cut else ""
            print(f"       {piece(i):<16} {after:7.4f} [{before:.4f}] {mark}".rstrip())

def chat_loop(params, config, tok, sampling, system=None, read=input, template=chat.PROJECT_TEMPLATE,
              stops=None) -> None:
    """Interactive chat with the checkpoint's chat template. The history is re-rendered each turn and its oldest
    turns are dropped to fit."""
    history = [{"role": "system", "content": system}] if system else []
    stops = chat.stop_tokens(tok, template) if stops is None else stops
    budget = config.max_seq_len - sampling["max_new_tokens"]
    if budget < 16:
        raise UsageError(f"--max-new-tokens={sampling['max_new_tokens']} leaves no room for the conversation in "
                         f"the model's context of {config.max_seq_len} tokens")
    print("chat: type a message, Ctrl-D or Ctrl-C to quit", file=sys.stderr)
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt) as e:
            _quit_chat(e)
            return
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        while True:
            prompt = chat.encode_conversation(tok, template, history, add_generation_prompt=True)
            turns = [i for i, m in enumerate(history) if m["role"] != "system"]
            if len(prompt) <= budget or len(turns) <= 1:
                break
            del history[turns[0]]  # the oldest turn goes first; the system message stays
        prompt = prompt[-budget:]
        print("assistant> ", end="", flush=True)
        out, reply = TextStream(tok, context=prompt[-1:]), []
        try:
            for token in stream(params, config, [prompt], stop_tokens=stops, **sampling):
                token = int(token[0])
                if token < 0 or token in stops:
                    break
                out.write(token)
                reply.append(token)
        except KeyboardInterrupt as e:
            out.close()
            _quit_chat(e)
            return
        out.close()
        print()
        history.append({"role": "assistant", "content": tok.decode(reply)})


def _quit_chat(e: BaseException) -> None:
    """Ctrl-D and Ctrl-C end a chat as a finished one (exit 0); SIGTERM stops the tool (main says so)."""
    if getattr(e, "signum", signal.SIGINT) != signal.SIGINT:
        raise e
    cli.stop_handled()
    print(file=sys.stderr)


def main(argv=None) -> int:
    quiet_library_noise()
    try:
        args = parse_args(argv)
        run(args)
    except SystemExit as e:  # argparse: --help (0) or a usage error, already printed
        return e.code if isinstance(e.code, int) else USER_ERROR
    except UserError as e:
        return fail(str(e))
    except KeyboardInterrupt as e:
        return stopped(e)
    except BrokenPipeError:  # the reader (e.g. `| head`) went away: not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
