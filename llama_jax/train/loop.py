"""The training run behind `train.py`, as a short sequence of named steps that a notebook can call one by one
(`run` is exactly this sequence):

    load_config -> check_run (refuses what cannot work, before anything is written) -> prepare_run_dir (one writer)
    -> initial_state (restore a checkpoint, or init / train.init_from) -> prepare_tokenizer -> prepare_data
    -> begin_records (config.yaml, metrics) -> train_loop -> finish

Nothing is written to the run directory until every check has passed; config.yaml only once the data is ready.
Signals, the run directory's lock and several processes are runtime.py's; the flags are cli/train.py's.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from llama_jax import files, lora, model, optim, sharding
from llama_jax.checkpoints import run_dir as checkpoint
from llama_jax.config import ConfigError, RunConfig, dump_yaml, load_run_config
from llama_jax.data import corpus as data
from llama_jax.data.shakespeare import default_corpus
from llama_jax.data.token_files import open_split
from llama_jax.errors import UserError
from llama_jax.eval import eval_sets, score_documents
from llama_jax.files import NotWritable, make_dirs
from llama_jax.host_memory import release_freed_memory
from llama_jax.text.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from llama_jax.train import step as T
from llama_jax.train.metrics import MetricsWriter, Throughput, plot_loss, truncate_after
from llama_jax.train.runtime import RunLock, Signals, on_process_zero, stop_requested


class TrainingDiverged(RuntimeError, UserError):
    """A non-finite loss or gradient norm: the run stops before the update reaches a checkpoint."""


SOURCE_RECORD = "tokenizer.source.json"  # in the run directory: what its own tokenizer was trained on


def run(config_path, overrides, run_dir=None, resume=False, signals: Signals | None = None) -> dict:
    """Trains per the config (a YAML preset and --section.key=value overrides); returns {"val_loss",
    "checkpoint", "step", "compile_s", "stopped_by"}. Each line is one step; a notebook can call them itself."""
    run_dir = Path(run_dir or Path("runs") / (Path(config_path).stem if config_path else "default"))
    config = load_config(config_path, overrides, run_dir, resume)
    mesh = check_run(config, run_dir, resume)
    own_signals, signals = signals is None, signals or Signals()
    lock = prepare_run_dir(run_dir)
    try:
        signals.check()  # between start-up phases: a stop signal during one ends the run here
        start = initial_state(config, run_dir, mesh, resume)
        signals.check()
        config, corpus = start.config, start.config.data.path or default_corpus()
        tok = on_process_zero(lambda: prepare_tokenizer(config, run_dir, corpus, start.tokenizer, start.meta))
        signals.check()
        splits = on_process_zero(lambda: prepare_data(config, run_dir, corpus, tok, progress=_is_main()))
        dc = config.data
        evals = eval_sets(config.train.eval_paths, tok, dc.text_field, dc.separator, dc.utf8_errors)
        signals.check()
        begin_records(config, run_dir, start)
        result = train_loop(config, run_dir, mesh, start, tok, splits, signals, evals)
        return finish(run_dir, result)
    finally:
        if lock is not None:
            lock.release()
        if own_signals:
            signals.restore()


# ---------------------------------------------------------------------------------------------------------------
# The steps, in the order run() takes them.


def load_config(config_path, overrides, run_dir: Path, resume: bool) -> RunConfig:
    """The run's config: the YAML file (a preset) with the flags' overrides; on resume, the run directory's own
    config.yaml with them (checkpoint.resumed_config: what may change, and what is refused)."""
    if resume and (run_dir / "config.yaml").is_file():
        return checkpoint.resumed_config(run_dir, overrides)
    return load_run_config(config_path, overrides)


def check_run(config: RunConfig, run_dir: Path, resume: bool):
    """Everything that can be refused before anything is written; returns the mesh."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir}: exists and is not a directory")
    has_ckpt = bool(checkpoint.step_dirs(run_dir / "checkpoints"))
    if has_ckpt and not resume:
        raise ConfigError(f"{run_dir} already has checkpoints; pass --resume to continue, or choose another --run-dir")
    if resume and not has_ckpt:
        raise ConfigError(f"--resume: {run_dir} has no checkpoint to resume from; leave out --resume to start a "
                          "new run there")
    mesh = sharding.make_mesh(config.train.mesh)
    tc = config.train
    if tc.warmup_steps > tc.steps:
        print(f"warning: train.warmup_steps={tc.warmup_steps} is more than train.steps={tc.steps}: the learning rate "
              f"is still rising when the run ends (at {tc.steps / tc.warmup_steps:.0%} of train.lr)", file=sys.stderr)
    micro, ways = tc.batch_size // tc.grad_accum, sharding.batch_size_divisor(mesh)
    if micro % ways or tc.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={tc.batch_size} / grad_accum={tc.grad_accum} = {micro} sequences per "
                          f"micro-batch must be divisible by the mesh's data x fsdp = {ways} and by the "
                          f"{jax.process_count()} processes")
    if config.data.tokenizer and not Path(config.data.tokenizer).exists():
        raise ConfigError(f"data.tokenizer={config.data.tokenizer}: no such file or directory")
    data.expand_paths(config.data.path) if config.data.path else None  # a missing corpus fails here, not later
    if tc.eval_paths and jax.process_count() > 1:
        raise ConfigError("train.eval_paths: scored on one process only; score the checkpoints with python -m "
                          "llama_jax.eval perplexity instead")
    for entry in tc.eval_paths:
        data.expand_paths(entry.split("=", 1)[-1])
    return mesh


def prepare_run_dir(run_dir: Path) -> RunLock | None:
    """Creates the run directory and takes its lock (process 0; the others write nothing there). Release it with
    `.release()` when the run ends."""
    if not _is_main():
        return None
    make_dirs(run_dir, "--run-dir")
    try:
        lock = RunLock(run_dir)
    except PermissionError as e:
        raise NotWritable(f"--run-dir {run_dir}: cannot write there ({e.strerror})") from None
    # What a save cut short by a kill or a full disk left: Orbax's temporary directories, never renamed into steps.
    # Only the lock's holder writes here, so none of them is a save in progress.
    for leftover in (run_dir / "checkpoints").glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(leftover, ignore_errors=True)
    checkpoint.empty_trash(run_dir / "checkpoints")  # steps a kill left half-deleted, never listed as steps
    return lock


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a run starts: its config (train.init_from's model config replaces ours), the train state on the mesh
    and its shardings, the step and the loader's position; and, when resuming, the restored checkpoint's metadata,
    or when starting from train.init_from, that checkpoint's tokenizer. A LoRA run (lora.rank > 0) trains adapters
    on the frozen `base` (init_from's parameters, in the compute dtype); `base_record` names it in checkpoints."""
    config: RunConfig
    state: optim.TrainState
    state_shard: Any
    step: int
    loader: data.LoaderState
    meta: dict | None = None
    tokenizer: Tokenizer | None = None
    base: Any = None
    base_record: dict | None = None


def initial_state(config: RunConfig, run_dir: Path, mesh, resume: bool) -> Start:
    """Resuming restores the newest usable checkpoint onto the mesh; otherwise parameters are initialised or taken
    from train.init_from (whose model config then replaces ours, execution switches aside). A LoRA run loads its
    base from train.init_from either way, and refuses a base other than the one its checkpoints record."""
    init_tok, init_params, base, base_record = None, None, None, None
    adapted = config.lora.rank > 0
    if config.train.init_from and (adapted or not resume):
        init_tok, model_config, init_params = _init_weights(config)
        config = dataclasses.replace(config, model=model_config)
    mc, tc, lc = config.model, config.train, config.lora
    if adapted:
        base_record = {"path": str(Path(tc.init_from).resolve()), "fingerprint": lora.fingerprint(init_params)}
        base_shard = sharding.state_shardings(init_params, sharding.param_specs(init_params, mesh), mesh)
        base = jax.device_put(jax.tree.map(lambda w: w.astype(mc.dtype), init_params), base_shard)
        init_params = None
    trainable = lambda key, p: optim.init_state(mc, tc, key, p, lora=lc)  # a LoRA run's: new adapters
    abstract = jax.eval_shape(lambda: trainable(jax.random.key(tc.seed), init_params))
    specs = {} if adapted else sharding.param_specs(abstract.params, mesh)  # adapters are small: replicated
    state_shard = sharding.state_shardings(abstract, specs, mesh)
    if resume:
        ckpt_dir = run_dir / "checkpoints"
        mgr = checkpoint.manager(ckpt_dir, async_save=False)
        try:
            check = lambda meta: _check_compatible(meta, config, run_dir, base_record)
            got = checkpoint.restore(mgr, checkpoint.abstract_like(abstract, state_shard), check=check,
                                     where=ckpt_dir)
        finally:
            checkpoint.close(mgr)
        if got is None:
            raise checkpoint.ResumeError(f"--resume: no usable checkpoint left in {ckpt_dir} (the damaged ones were "
                                         "moved aside as STEP.bad)")
        step, state, meta = got
        return Start(config, state, state_shard, step, data.LoaderState.from_dict(meta["loader"]), meta,
                     base=base, base_record=base_record)
    init = jax.jit(trainable, out_shardings=state_shard)
    state = init(jax.random.key(tc.seed), init_params)
    return Start(config, state, state_shard, 0, data.LoaderState(seed=tc.seed), tokenizer=init_tok, base=base,
                 base_record=base_record)


def _init_weights(config: RunConfig):
    """(tokenizer, model config, params) of train.init_from: a run directory, a Hugging Face directory, a GGUF file
    or a llama2.c file (its tokenizer: data.tokenizer, or its own)."""
    from llama_jax.checkpoints.load import load_checkpoint

    ckpt = load_checkpoint(config.train.init_from, tokenizer=config.data.tokenizer or None,
                           flags=("train.init_from", "data.tokenizer"))
    keep = {f: getattr(config.model, f) for f in ("dtype", "attention_impl", "remat", "scan_layers")}
    return ckpt.tokenizer, ckpt.config.replace(**keep), ckpt.params


def _check_compatible(saved_meta: dict, current: RunConfig, where: Path, base_record: dict | None = None):
    """Refuses, before any array is read, a resume whose model config or optimizer state layout differs from the
    checkpoint's (so such a checkpoint is never mistaken for a damaged one), or a LoRA run's other base."""
    saved_config = checkpoint.run_config_of(saved_meta)
    saved_base = saved_meta.get("lora_base")
    if base_record is not None and saved_base and saved_base["fingerprint"] != base_record["fingerprint"]:
        raise checkpoint.ResumeError(f"cannot resume {where}: train.init_from={current.train.init_from} is not the "
                                     f"base its adapters were trained on ({saved_base['path']}, fingerprint "
                                     f"{saved_base['fingerprint']}; this one has {base_record['fingerprint']})")
    saved, now = dataclasses.asdict(saved_config.model), dataclasses.asdict(current.model)
    keep = ("dtype", "attention_impl", "remat", "scan_layers")  # execution switches may change between runs
    diff = [f"{k} (saved {saved[k]!r}, now {now[k]!r})" for k in now if k not in keep and saved[k] != now[k]]
    if diff:
        raise checkpoint.ResumeError(f"cannot resume {where}: the model config differs: {', '.join(diff)}")
    saved_train = saved_config.train
    layout = lambda tc: jax.tree.structure(jax.eval_shape(
        lambda: optim.init_state(current.model, tc, jax.random.key(0), lora=current.lora)).opt_state)
    if layout(saved_train) != layout(current.train):
        changed = [f"train.{k} (saved {getattr(saved_train, k)!r}, now {v!r})"
                   for k, v in dataclasses.asdict(current.train).items() if getattr(saved_train, k) != v]
        raise checkpoint.ResumeError(f"cannot resume {where}: these settings change the optimizer state's layout: "
                                     f"{', '.join(changed)}")


def prepare_tokenizer(config: RunConfig, run_dir: Path, corpus, init_tok, meta: dict | None):
    """The run's tokenizer, kept in the run directory (tokenizer.model, or tokenizer.json with its config and chat
    template). Resuming: the checkpoint's own. Else the one given (data.tokenizer: a tokenizer.model, a
    tokenizer.json or a Hugging Face directory; or the init_from checkpoint's), copied in; else one trained on the
    corpus, reused only if an earlier attempt in this directory trained it on the same files with the same
    settings."""
    target = run_dir / "tokenizer.model"
    if meta is not None:  # resuming: the checkpoint holds the tokenizer it was trained with
        saved = checkpoint.tokenizer_of(meta, run_dir)
        if config.data.tokenizer and load_tokenizer(config.data.tokenizer).files != saved.files:
            raise ConfigError(f"data.tokenizer={config.data.tokenizer} differs from the tokenizer the checkpoint in "
                              f"{run_dir} was trained with")
        _keep_copy(saved, run_dir)
        return _check_vocab(saved, config)
    if config.data.tokenizer or init_tok is not None:
        # init_from's checkpoint already loaded its tokenizer (data.tokenizer, if given, replaced it)
        tok = init_tok or load_tokenizer(config.data.tokenizer)  # one line if it is neither kind of tokenizer
        _keep_copy(tok, run_dir)
        (run_dir / SOURCE_RECORD).unlink(missing_ok=True)
        return _check_vocab(tok, config)
    record = {"corpus": data.corpus_fingerprint(corpus, config.data.text_field, config.data.separator),
              "vocab_size": config.model.vocab_size, "type": config.data.tokenizer_type, "format": config.data.format}
    if target.is_file():
        if _read_json(run_dir / SOURCE_RECORD) == record:
            return _check_vocab(Tokenizer(target), config)
        print(f"note: {target} was left by an earlier attempt with other data or settings; training a new one",
              file=sys.stderr)
    print(f"training a {config.data.tokenizer_type} tokenizer (vocab {config.model.vocab_size}) on the corpus",
          file=sys.stderr)
    if config.data.format == "chat":
        from llama_jax.data.chat import conversation_texts

        texts = conversation_texts(corpus, config.data.utf8_errors)
    else:
        texts = (t for _, t in data.iter_documents(corpus, config.data.text_field, config.data.separator,
                                                   config.data.utf8_errors))
    tok = train_tokenizer(texts, config.model.vocab_size, target, config.data.tokenizer_type)
    _keep_copy(tok, run_dir)
    files.write_atomic(run_dir / SOURCE_RECORD, json.dumps(record).encode())
    return _check_vocab(tok, config)


def _keep_copy(tok, run_dir: Path) -> None:
    """The run directory's copy of its tokenizer's files (only those of its own kind: a stale tokenizer.json never
    sits beside a tokenizer.model)."""
    from llama_jax.text.tokenizer import HFTokenizer

    names = set(tok.files)
    for name in set(HFTokenizer.FILES) | {"tokenizer.model"}:
        path = run_dir / name
        if name in names:
            if not path.is_file() or path.read_bytes() != tok.files[name]:
                files.write_atomic(path, tok.files[name])
        else:
            path.unlink(missing_ok=True)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_vocab(tok, config: RunConfig):
    if tok.vocab_size > config.model.vocab_size:  # fewer is fine: padded vocabularies leave rows unused
        raise ConfigError(f"tokenizer {tok.model_file} has {tok.vocab_size} pieces but model.vocab_size="
                          f"{config.model.vocab_size}; set --model.vocab_size={tok.vocab_size}")
    return tok


def prepare_data(config: RunConfig, run_dir: Path, corpus, tok, progress: bool):
    """Token files in data.cache_dir (default RUN_DIR/data); returns the (train, validation) splits."""
    cache = Path(config.data.cache_dir or run_dir / "data")
    own_cache = config.data.cache_dir is None  # tokens of another tokenizer there are ours to replace
    if config.data.format == "chat":
        from llama_jax.data.chat import prepare_chat
        from llama_jax.text.chat_template import PROJECT_TEMPLATE

        prepare_chat(corpus, tok, cache, val_fraction=config.data.val_fraction, seed=config.train.seed,
                     seq_len=config.train.seq_len, utf8_errors=config.data.utf8_errors,
                     template=tok.chat_template or PROJECT_TEMPLATE, replace_other_tokenizer=own_cache)
    else:
        data.prepare(corpus, tok, cache, val_fraction=config.data.val_fraction, seed=config.train.seed,
                     text_field=config.data.text_field, separator=config.data.separator,
                     utf8_errors=config.data.utf8_errors, progress=progress, replace_other_tokenizer=own_cache)
    return open_split(cache, "train", tok), open_split(cache, "val", tok)


def begin_records(config: RunConfig, run_dir: Path, start: Start) -> None:
    """Every check has passed: config.yaml is written, and metrics.jsonl is cut back to the resumed step (or
    started afresh)."""
    if not _is_main():
        return
    dump_yaml(config, run_dir / "config.yaml")
    if start.meta is not None:
        print(f"resumed from {run_dir / 'checkpoints' / str(start.step)}", file=sys.stderr)
        truncate_after(run_dir / "metrics.jsonl", start.step)
    else:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)


def train_loop(config: RunConfig, run_dir: Path, mesh, start: Start, tok, splits, signals: Signals,
               evals: dict | None = None) -> dict:
    """The steps from start.step to train.steps: validation (and the train.eval_paths sets, see eval.eval_sets)
    every eval_every steps, a checkpoint every save_every, and one when a signal asks the run to stop."""
    mc, tc = config.model, config.train
    train_split, val_split = splits
    ckpt_dir = run_dir / "checkpoints"
    loader = data.Loader(train_split, tc.seq_len, tc.batch_size // jax.process_count(), start.loader,
                         config.data.document_masking, jax.process_index(), jax.process_count())
    base = () if start.base is None else (start.base,)  # a LoRA run's frozen base: the steps' third argument
    step_fn, eval_fn = T.jit_steps(mc, tc, start.state_shard, sharding.batch_sharding(mesh), config.lora,
                                   jax.tree.map(lambda x: x.sharding, start.base))
    if val_split.n_tokens < 2:
        print("warning: the validation split is empty (too few documents for data.val_fraction="
              f"{config.data.val_fraction}); training without validation", file=sys.stderr)
    from tqdm import tqdm

    state, step = start.state, start.step
    mgr = checkpoint.manager(ckpt_dir, keep=tc.keep_checkpoints)
    bar = tqdm(total=tc.steps, initial=step, disable=not _is_main(), dynamic_ncols=True, unit="step")
    writer = MetricsWriter(run_dir, enabled=_is_main())
    clock = Throughput(config, step)
    pending, last_saved, val_loss, stop, compile_s = None, step if step else -1, None, None, None
    batches = iter(loader)
    release_freed_memory()  # what start-up freed (a checkpoint read, the data prepared) is not kept for the steps
    signals.begin_training()
    try:
        while step < tc.steps and stop is None:
            gbatch = sharding.global_batch(next(batches)[0], mesh)
            if compile_s is None:
                step_fn, compile_s = _compile(step_fn, (state, gbatch, *base), config, mesh)
            state, metrics = step_fn(state, gbatch, *base)
            step += 1
            if pending is not None:  # fetched one step late so the device never waits for the host
                _log(*pending, writer, bar, tc)
            pending = (step, metrics, clock.tick(step, metrics))
            stop = stop_requested(signals, step)
            if step % tc.eval_every == 0 or step == tc.steps:
                _log(*pending, writer, bar, tc)
                pending = None
                val_loss = validate(config, state.params, eval_fn, val_split, evals, mesh, step, writer, bar, base)
                release_freed_memory()  # the validation's buffers, before the steps go on
                clock.restart(step)  # evaluation time is not training throughput
            if step % tc.save_every == 0 or step == tc.steps or stop is not None:
                if pending is not None:
                    _log(*pending, writer, bar, tc)  # checks the loss and gradient are finite before saving
                    pending = None
                meta = {"step": step, "loader": loader.state.to_dict(), "config": config.to_dict(),
                        **checkpoint.tokenizer_meta(tok)}  # the tokenizer's files travel with the weights
                if start.base_record is not None:
                    meta["lora_base"] = start.base_record
                checkpoint.save(mgr, step, state, meta, where=ckpt_dir)
                last_saved = step
                clock.restart(step)
            elif last_saved > 0:
                checkpoint.finish_saving(mgr, ckpt_dir, block=False)  # a failed asynchronous save stops the run
        if pending is not None:
            _log(*pending, writer, bar, tc)
        checkpoint.finish_saving(mgr, ckpt_dir)
    finally:
        bar.close()
        checkpoint.close(mgr)  # waits for a save in flight, so the newest good checkpoint is complete
        writer.close()
    return {"val_loss": val_loss, "checkpoint": str(ckpt_dir / str(last_saved)), "step": step,
            "compile_s": compile_s, "stopped_by": stop}


def finish(run_dir: Path, result: dict) -> dict:
    """Says how the run ended (and how to continue a stopped one), and draws loss.png; returns the result."""
    if result["stopped_by"] is not None:
        print(f"stopped by {result['stopped_by']} after step {result['step']}; saved {result['checkpoint']} "
              f"(continue with --resume --run-dir {run_dir})", file=sys.stderr)
    plot = plot_loss(run_dir) if _is_main() else None
    if result["val_loss"] is not None:
        loss = result["val_loss"]
        print(f"validation loss {loss:.4f} (perplexity {np.exp(min(loss, 50)):.2f}) at step {result['step']}")
    print(f"checkpoint: {result['checkpoint']}")
    if _is_main():  # where the run's records went
        print(f"metrics: {run_dir / 'metrics.jsonl'}" + (f", loss plot: {plot}" if plot else "")
              + f", TensorBoard: tensorboard --logdir {run_dir}")
    return result


# ---------------------------------------------------------------------------------------------------------------
# Inside the loop.


def validate(config: RunConfig, params, eval_fn, val_split, evals: dict | None, mesh, step: int, writer,
             bar, base=()) -> float | None:
    """The validation loss over train.eval_batches batches (None when the split is empty), and the
    train.eval_paths sets scored in windows of train.seq_len; both written to the metrics. Returns the loss.
    base: a LoRA run's (frozen base,), params then being its adapters."""
    tc = config.train
    total = count = 0.0
    for b in data.eval_batches(val_split, tc.seq_len, tc.batch_size, tc.eval_batches,
                               config.data.document_masking):
        if jax.process_count() > 1:  # each process feeds its slice of the same global batch
            b = {k: np.array_split(v, jax.process_count())[jax.process_index()] for k, v in b.items()}
        ce, n = eval_fn(params, sharding.global_batch(b, mesh), *base)
        total, count = total + float(ce), count + float(n)
    val_loss = total / count if count else None
    if val_loss is not None:
        ppl = np.exp(min(val_loss, 50))
        writer.write(step, {"val_loss": val_loss, "val_ppl": ppl, "tokens_seen": step * tc.batch_size * tc.seq_len})
        bar.write(f"step {step}: validation loss {val_loss:.4f} (perplexity {ppl:.2f})")
    if evals and base:
        params = lora.merge_adapters(base[0], params, config.lora)
    for name, (docs, n_bytes) in (evals or {}).items():
        r = score_documents(params, config.model, docs, n_bytes, name, window=tc.seq_len, stride=tc.seq_len // 2)
        writer.write(step, {f"eval_{name}_loss": r["nll"], f"eval_{name}_bpb": r["bits_per_byte"]})
        bar.write(f"step {step}: {name} loss {r['nll']:.4f} (bits per byte {r['bits_per_byte']:.4f})")
    return val_loss


def _compile(step_fn, args, config: RunConfig, mesh):
    t0 = time.perf_counter()
    compiled = step_fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    trained = "" if not config.lora.rank else \
        f", LoRA rank {config.lora.rank}: {sum(x.size for x in jax.tree.leaves(args[0].params)) / 1e6:.2f}M trained"
    print(f"compiled the train step in {compile_s:.1f}s ({model.param_count(config.model) / 1e6:.2f}M parameters"
          f"{trained}, mesh {dict(mesh.shape)})", file=sys.stderr)
    return compiled, compile_s


def _is_main() -> bool:
    return jax.process_index() == 0


def _log(step, metrics, rates, writer, bar, tc):
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = [k for k in ("loss", "grad_norm") if not np.isfinite(m[k])]
    if bad:
        raise TrainingDiverged(f"{bad[0]} is {m[bad[0]]} at step {step}; stopped without saving it, the last good "
                               "checkpoint is kept (try a lower --train.lr or --train.grad_clip)")
    post = {"loss": f"{m['loss']:.3f}", "lr": f"{m['lr']:.2e}"}
    if rates:
        post |= {"tok/s": f"{rates['tok_per_s']:.0f}", "MFU": f"{100 * rates['mfu']:.1f}%"}
    bar.set_postfix(post, refresh=False)  # before the update, whose refresh draws it: the bar shows this step's
    bar.update(step - bar.n)
    if step % tc.log_every == 0 or step == tc.steps or rates:
        writer.write(step, {"loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
                            "tokens_seen": step * tc.batch_size * tc.seq_len, **(rates or {}),
                            **({"z_loss": m["z_loss"]} if tc.z_loss else {})})
