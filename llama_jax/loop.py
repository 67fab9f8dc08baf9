"""The training run behind `train.py`: run directory, tokenizer, data, mesh, checkpoints, signals and logging."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np

from llama_jax import checkpoint, data, model, sharding
from llama_jax import train as T
from llama_jax.config import ConfigError, RunConfig, dump_yaml, load_run_config
from llama_jax.hf import CheckpointError
from llama_jax.metrics import MetricsWriter, plot_loss, truncate_after
from llama_jax.tokenizer import Tokenizer, TokenizerError, train_tokenizer

ERRORS = (ConfigError, data.DataError, TokenizerError, checkpoint.ResumeError, CheckpointError)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="train.py", description="Pretrain or fine-tune a LLaMA-style model.",
        epilog="Any config field can be overridden with --section.key=value, e.g. --train.steps=200 "
               "--model.dim=256 --data.path='corpus/*.txt'.")
    p.add_argument("--config", help="YAML preset with model/data/train sections (configs/*.yaml)")
    p.add_argument("--run-dir", help="directory for checkpoints, metrics and the tokenizer (default runs/<config>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --run-dir")
    p.add_argument("--init-from", help="start from these weights: a run directory or a Hugging Face Llama directory")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=4,tensor=1 (same as --train.mesh)")
    p.add_argument("--coordinator", help="multi-host: address:port of process 0 (calls jax.distributed.initialize)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index")
    args, rest = p.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--") or "=" not in item or "." not in item.split("=")[0]:
            p.error(f"unrecognized argument {item!r} (overrides look like --section.key=value)")
        overrides.append(item[2:])
    if args.mesh is not None:
        overrides.append(f"train.mesh={args.mesh}")
    if args.init_from is not None:
        overrides.append(f"train.init_from={args.init_from}")
    return args, overrides


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    try:
        if args.coordinator or args.num_processes:
            jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        run(args.config, overrides, args.run_dir, args.resume)
    except ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


class TrainingDiverged(RuntimeError):
    pass


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and exits cleanly."""

    def __init__(self):
        self.signal = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: the user really means it
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def _tokenizer(config: RunConfig, run_dir: Path, corpus, init_dir: Path | None) -> Tokenizer:
    target = run_dir / "tokenizer.model"
    source = config.data.tokenizer or (init_dir / "tokenizer.model" if init_dir else None)
    if target.is_file() and source is None:
        tok = Tokenizer(target)  # resuming, or re-running in the same directory
    elif source is not None:
        tok = Tokenizer(source)
        if Path(source).resolve() != target.resolve():
            shutil.copyfile(source, target)
            tok = Tokenizer(target)
    elif jax.process_index() == 0 or not target.is_file():
        print(f"training a {config.data.tokenizer_type} tokenizer (vocab {config.model.vocab_size}) on the corpus",
              file=sys.stderr)
        if config.data.format == "chat":
            from llama_jax.chat import conversation_texts

            texts = conversation_texts(corpus)
        else:
            texts = (t for _, t in data.iter_documents(corpus, config.data.text_field, config.data.separator,
                                                       config.data.utf8_errors))
        tok = train_tokenizer(texts, config.model.vocab_size, target, config.data.tokenizer_type)
    if tok.vocab_size > config.model.vocab_size:  # fewer is fine: padded vocabularies leave rows unused
        raise ConfigError(f"tokenizer {tok.model_file} has {tok.vocab_size} pieces but model.vocab_size="
                          f"{config.model.vocab_size}; set --model.vocab_size={tok.vocab_size}")
    return tok


def _init_weights(config: RunConfig):
    """(model config, params) from train.init_from: a run directory or a Hugging Face directory."""
    from llama_jax.hf import load_hf_checkpoint

    src = Path(config.train.init_from)
    if (src / "checkpoints").is_dir():
        model_config, params, _ = load_run_params(src)
    elif (src / "config.json").is_file():
        model_config, params = load_hf_checkpoint(src)
    else:
        raise ConfigError(f"train.init_from={src}: neither a run directory (with checkpoints/) nor a Hugging Face "
                          "directory (with config.json)")
    keep = {f: getattr(config.model, f) for f in ("dtype", "attention_impl", "remat", "scan_layers")}
    return src, model_config.replace(**keep), params


def load_run_params(run_dir, step: int | None = None):
    """(ModelConfig, params, meta) from a run directory's newest (or given) checkpoint, onto the default device."""
    from llama_jax.config import build

    mgr = checkpoint.manager(Path(run_dir) / "checkpoints", async_save=False)
    steps = sorted(mgr.all_steps())
    if not steps:
        raise checkpoint.ResumeError(f"{run_dir}: no complete checkpoint in checkpoints/")
    meta = checkpoint.read_meta(mgr, steps[-1] if step is None else step)
    run_config = load_run_config(None, [])
    run_config = dataclasses.replace(
        run_config, model=build(type(run_config.model), meta["config"]["model"], "model"),
        train=build(type(run_config.train), meta["config"]["train"], "train"))
    abstract = jax.eval_shape(lambda: T.init_state(run_config.model, run_config.train, jax.random.key(0)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    got = checkpoint.restore(mgr, abstract, step)
    mgr.close()
    if got is None:
        raise checkpoint.ResumeError(f"{run_dir}: no readable checkpoint")
    step, state, meta = got
    return run_config.model, state.params, meta | {"step": step}


def save_imported(run_dir, model_config, params, tok: Tokenizer) -> Path:
    """Writes weights from elsewhere (e.g. Hugging Face) as step 0 of a new run directory, with a fresh optimizer
    state, so that generate.py, train.py --init-from and --resume can use it."""
    run_dir = Path(run_dir)
    if (run_dir / "checkpoints").is_dir():
        raise ConfigError(f"{run_dir} already has checkpoints; choose a new directory")
    if tok.vocab_size > model_config.vocab_size:
        raise ConfigError(f"{tok.model_file}: {tok.vocab_size} pieces, more than the model's vocabulary "
                          f"{model_config.vocab_size}")
    base = load_run_config(None, [f"train.seq_len={min(256, model_config.max_seq_len)}"])
    config = dataclasses.replace(base, model=model_config)
    run_dir.mkdir(parents=True)
    shutil.copyfile(tok.model_file, run_dir / "tokenizer.model")
    dump_yaml(config, run_dir / "config.yaml")
    state = T.init_state(model_config, config.train, jax.random.key(0), params)
    mgr = checkpoint.manager(run_dir / "checkpoints", async_save=False)
    meta = {"step": 0, "loader": data.LoaderState(config.train.seed).to_dict(), "config": config.to_dict(),
            "tokenizer": checkpoint.encode_bytes(tok.model_bytes)}
    checkpoint.save(mgr, 0, state, meta)
    mgr.wait_until_finished()
    mgr.close()
    return run_dir


def _check_compatible(saved: dict, current: RunConfig, where: Path):
    now = dataclasses.asdict(current.model)
    keep = ("dtype", "attention_impl", "remat", "scan_layers")  # execution switches may change between runs
    diff = [f"{k} (saved {saved.get(k)!r}, now {now[k]!r})" for k in now if k not in keep and saved.get(k) != now[k]]
    if diff:
        raise checkpoint.ResumeError(f"cannot resume {where}: the model config differs: {', '.join(diff)}")


def run(config_path, overrides, run_dir=None, resume=False) -> dict:
    """Trains per the config; returns {"val_loss", "checkpoint", "step"}."""
    run_dir = Path(run_dir or Path("runs") / (Path(config_path).stem if config_path else "default"))
    if config_path is None and resume and (run_dir / "config.yaml").is_file():
        config_path = run_dir / "config.yaml"
    config = load_run_config(config_path, overrides)
    ckpt_dir = run_dir / "checkpoints"
    has_ckpt = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if has_ckpt and not resume:
        raise ConfigError(f"{run_dir} already has checkpoints; pass --resume to continue, or choose another --run-dir")
    mesh = sharding.make_mesh(config.train.mesh)  # fails fast, before any data work
    micro, ways = config.train.batch_size // config.train.grad_accum, sharding.batch_size_divisor(mesh)
    if micro % ways or config.train.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={config.train.batch_size} / grad_accum={config.train.grad_accum} = "
                          f"{micro} sequences per micro-batch must be divisible by the mesh's data x fsdp = {ways} "
                          f"and by the {jax.process_count()} processes")
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0

    init_dir, init_params = None, None
    if config.train.init_from and not has_ckpt:
        init_dir, model_config, init_params = _init_weights(config)
        config = dataclasses.replace(config, model=model_config)
    corpus = config.data.path or data.default_corpus()
    tok = _tokenizer(config, run_dir, corpus, init_dir)
    if is_main:
        dump_yaml(config, run_dir / "config.yaml")
    mc, tc = config.model, config.train

    # Data: prepared token files, a shuffled loader per process, validation batches.
    cache = Path(config.data.cache_dir or run_dir / "data")
    if config.data.format == "chat":
        from llama_jax.chat import prepare_chat

        prepare_chat(corpus, tok, cache, val_fraction=config.data.val_fraction, seed=tc.seed, seq_len=tc.seq_len)
    else:
        data.prepare(corpus, tok, cache, val_fraction=config.data.val_fraction, seed=tc.seed,
                     text_field=config.data.text_field, separator=config.data.separator,
                     utf8_errors=config.data.utf8_errors, progress=is_main)
    train_split, val_split = data.open_split(cache, "train", tok), data.open_split(cache, "val", tok)

    abstract = jax.eval_shape(lambda: T.init_state(mc, tc, jax.random.key(tc.seed)))
    state_shard = sharding.state_shardings(abstract, sharding.param_specs(abstract.params, mesh), mesh)
    batch_shard = sharding.batch_sharding(mesh)

    mgr = checkpoint.manager(ckpt_dir, keep=tc.keep_checkpoints)
    loader_state = data.LoaderState(seed=tc.seed)
    check = lambda meta: _check_compatible(meta["config"]["model"], config, run_dir)
    restored = checkpoint.restore(mgr, checkpoint.abstract_like(abstract, state_shard), check=check) if has_ckpt \
        else None
    if restored is not None:
        step0, state, meta = restored
        loader_state = data.LoaderState.from_dict(meta["loader"])
        print(f"resumed from {ckpt_dir / str(step0)}", file=sys.stderr)
        if is_main:
            truncate_after(run_dir / "metrics.jsonl", step0)
    else:
        init = jax.jit(lambda key, p: T.init_state(mc, tc, key, p), out_shardings=state_shard)
        state = init(jax.random.key(tc.seed), init_params)
        if is_main:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    per_process = tc.batch_size // jax.process_count()
    loader = data.Loader(train_split, tc.seq_len, per_process, loader_state, config.data.document_masking,
                         jax.process_index(), jax.process_count())
    step_fn, eval_fn = T.jit_steps(mc, tc, state_shard, batch_shard)
    peak = tc.peak_flops or T.measure_peak_flops(mc.dtype)
    flops_per_step = model.flops_per_token(mc, tc.seq_len) * tc.batch_size * tc.seq_len
    writer = MetricsWriter(run_dir, enabled=is_main)

    def evaluate(params) -> float:
        total = count = 0.0
        for b in data.eval_batches(val_split, tc.seq_len, tc.batch_size, tc.eval_batches,
                                   config.data.document_masking):
            if jax.process_count() > 1:  # each process feeds its slice of the same global batch
                b = {k: np.array_split(v, jax.process_count())[jax.process_index()] for k, v in b.items()}
            ce, n = eval_fn(state.params, sharding.global_batch(b, mesh))
            total, count = total + float(ce), count + float(n)
        return total / count if count else float("nan")

    def save(step: int):
        meta = {"step": step, "loader": loader.state.to_dict(), "config": config.to_dict(),
                "tokenizer": checkpoint.encode_bytes(tok.model_bytes)}
        checkpoint.save(mgr, step, state, meta)

    from tqdm import tqdm

    stop = _Stop()
    step = int(state.step)
    bar = tqdm(total=tc.steps, initial=step, disable=not is_main, dynamic_ncols=True, unit="step")
    pending, last_saved, val_loss = None, step if restored else -1, None
    t_mark, tokens_mark, compile_s = None, 0, None
    batches = iter(loader)
    try:
        while step < tc.steps and stop.signal is None:
            batch, _ = next(batches)
            gbatch = sharding.global_batch(batch, mesh)
            if compile_s is None:
                t0 = time.perf_counter()
                step_fn = step_fn.lower(state, gbatch).compile()
                compile_s = time.perf_counter() - t0
                print(f"compiled the train step in {compile_s:.1f}s ({model.param_count(mc) / 1e6:.2f}M parameters,"
                      f" mesh {dict(mesh.shape)})", file=sys.stderr)
            state, metrics = step_fn(state, gbatch)
            step += 1
            if pending is not None:  # fetched one step late so the device never waits for the host
                _log(*pending, writer, bar, tc)
            pending = (step, metrics, None)
            if t_mark is None:
                jax.block_until_ready(metrics)
                t_mark, tokens_mark = time.perf_counter(), step
            elif step % tc.log_every == 0 or step == tc.steps:
                jax.block_until_ready(metrics)
                elapsed = time.perf_counter() - t_mark
                rate = (step - tokens_mark) * tc.batch_size * tc.seq_len / elapsed
                mfu = rate / (tc.batch_size * tc.seq_len) * flops_per_step / (peak * jax.device_count())
                pending = (step, metrics, {"tok_per_s": rate, "mfu": mfu})
                t_mark, tokens_mark = time.perf_counter(), step
            if step % tc.eval_every == 0 or step == tc.steps:
                _log(*pending, writer, bar, tc)
                pending = None
                val_loss = evaluate(state.params)
                writer.write(step, {"val_loss": val_loss, "val_ppl": np.exp(min(val_loss, 50)),
                                    "tokens_seen": step * tc.batch_size * tc.seq_len})
                bar.write(f"step {step}: validation loss {val_loss:.4f} (perplexity {np.exp(min(val_loss, 50)):.2f})")
                t_mark, tokens_mark = time.perf_counter(), step  # evaluation time is not training throughput
            if step % tc.save_every == 0 or step == tc.steps or stop.signal is not None:
                if pending is not None:
                    _log(*pending, writer, bar, tc)  # also checks the loss is finite before saving
                    pending = None
                save(step)
                last_saved = step
                t_mark, tokens_mark = time.perf_counter(), step
        if pending is not None:
            _log(*pending, writer, bar, tc)
        if stop.signal is not None and last_saved != step:
            save(step)
            last_saved = step
    finally:
        bar.close()
        stop.restore()
        mgr.wait_until_finished()
        mgr.close()
        writer.close()
    if stop.signal is not None:
        print(f"stopped by {stop.signal} after step {step}; saved {ckpt_dir / str(last_saved)} "
              f"(continue with --resume --run-dir {run_dir})", file=sys.stderr)
    if is_main:
        plot_loss(run_dir)
    path = ckpt_dir / str(last_saved)
    if val_loss is not None:
        print(f"validation loss {val_loss:.4f} (perplexity {np.exp(min(val_loss, 50)):.2f}) at step {step}")
    print(f"checkpoint: {path}")
    return {"val_loss": val_loss, "checkpoint": str(path), "step": step, "compile_s": compile_s}


def _log(step, metrics, rates, writer, bar, tc):
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(m["loss"]):
        raise TrainingDiverged(f"loss is {m['loss']} at step {step}; stopped without saving it, the last good "
                               "checkpoint is kept (try a lower --train.lr or --train.grad_clip)")
    bar.update(step - bar.n)
    post = {"loss": f"{m['loss']:.3f}", "lr": f"{m['lr']:.2e}"}
    if rates:
        post |= {"tok/s": f"{rates['tok_per_s']:.0f}", "MFU": f"{100 * rates['mfu']:.1f}%"}
    bar.set_postfix(post, refresh=False)
    if step % tc.log_every == 0 or step == tc.steps or rates:
        writer.write(step, {"loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
                            "tokens_seen": step * tc.batch_size * tc.seq_len, **(rates or {}),
                            **({"z_loss": m["z_loss"]} if tc.z_loss else {})})
