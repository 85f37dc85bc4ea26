"""Fine-tuning with optax: full or LoRA, data-parallel or sharded (FSDP / tensor), checkpointed and resumable.

    result = train(model, "train.jsonl", TrainConfig(lora=LoraConfig(rank=8), max_steps=200), out_dir="run")

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences (optax.MultiSteps
averages their gradients). The optimizer is AdamW with linear warm-up and cosine decay to
`min_lr_ratio * learning_rate`, after clipping the global gradient norm. Master weights
(everything trained) are float32; the products run in `compute_dtype` (float32 on CPU,
bfloat16 on GPU/TPU), the loss and norms in float32 (mixed precision). With `remat`, each
layer's activations are recomputed in the backward pass.

The loss is the mean cross-entropy over the target tokens of a micro-batch (the response
and its `</s>`; see data.py).

Devices: training runs on the mesh `TrainConfig.mesh` ("data=8", "data=2,fsdp=4",
"fsdp=2,tensor=4"; see sharding.py), built on the first devices it needs. The batch rows
are split over the data and fsdp axes. Full fine-tuning shards the parameters and every
optimizer-state leaf that mirrors one (Adam moments, accumulated gradients) by
`sharding.param_shardings` (hidden dim on fsdp, heads/features/vocabulary on tensor); counts
are replicated. LoRA shards the frozen base the same way and replicates the (small) adapters
and their optimizer state. The step is jitted with these in/out shardings, so no device
holds a whole sharded weight; Orbax saves the sharded state and restores it against
`abstract_state` (ShapeDtypeStructs carrying the NamedShardings). Without `mesh` the batch
is split over as many devices as divide `batch_size`, everything else replicated.

Output directory:

    <out>/checkpoints/<step>/   Orbax (CheckpointManager): trained params + optimizer state,
                                and the data position; every `save_steps`, the last
                                `keep_checkpoints` kept. A new run on the same <out> resumes
                                from the latest and repeats the same loss curve (at
                                max_steps already, it trains nothing: history is empty);
                                with resume=False it deletes them and starts over.
    <out>/train_log.jsonl       one JSON line per logged step (loss, lr, tokens/s, eval loss),
                                appended to when resuming, else rewritten
    <out>/model/                full fine-tuning (or LoRA with merge_lora): a converted
                                bluelm-jax directory, loadable by bluelm_jax.load and
                                exportable by `bluelm-export` (hf/to_hf.py)
    <out>/adapter/              LoRA: the adapters only (see lora.py)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bluelm_jax import data as D
from bluelm_jax import lora as L
from bluelm_jax import sharding as S
from bluelm_jax.config import BlueLMConfig
from bluelm_jax.loading import default_compute_dtype
from bluelm_jax.model import forward
from bluelm_jax.params import require_kernel_layout

NamedSharding, PS = jax.sharding.NamedSharding, jax.sharding.PartitionSpec


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every training setting (the command line maps onto these fields one to one)."""

    seq_len: int = 512  # longest sample, <s> and </s> included
    batch_size: int = 8  # sequences per micro-batch, over all devices
    grad_accum: int = 1  # micro-batches per optimizer step
    learning_rate: float = 2e-5
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # the cosine decays to this fraction of learning_rate at max_steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    max_steps: int = 100  # optimizer steps
    save_steps: int = 0  # checkpoint every this many steps (0: none; the final model is always written)
    keep_checkpoints: int = 3
    eval_steps: int = 0  # evaluate every this many steps (0: only at the end)
    log_steps: int = 10
    seed: int = 0  # data order, LoRA init and dropout
    remat: bool = False
    compute_dtype: Optional[str] = None  # None: float32 on CPU, bfloat16 on GPU/TPU
    lora: Optional[L.LoraConfig] = None  # None: full fine-tuning
    merge_lora: bool = False  # also write <out>/model with the adapters merged
    data: D.DataFormat = D.DataFormat()
    skip_bad_lines: bool = False
    mesh: Optional[str] = None  # "data=2,fsdp=4", "fsdp=2,tensor=4" (sharding.py); None: data over all dividing batch_size

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "keep_checkpoints", "log_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "save_steps", "eval_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.mesh is not None:
            sizes = S.parse_mesh(self.mesh)  # MeshError (a ValueError) on a bad description
            if -1 not in sizes.values():
                S.check_batch_split(self.batch_size, sizes)


class TrainState(NamedTuple):
    step: jax.Array  # [] int32: micro-batches done
    params: Any  # what is trained: the full parameter tree, or the LoRA tree {"a", "b"}
    opt_state: Any


@dataclasses.dataclass
class TrainResult:
    params: Any  # trained tree (full params, or LoRA {"a", "b"})
    history: list  # one dict per optimizer step: step, loss, lr, tokens, tokens_per_s, grad_norm
    eval_loss: Optional[float]
    model_dir: Optional[str]
    adapter_dir: Optional[str]
    skipped: list  # bad records skipped with skip_bad_lines
    resumed_from: Optional[int]


# ------------------------------------------------------------------ pure pieces


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean cross-entropy over weighted positions, their count). logits [b, t, vocab] float32."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)  # [b, t]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [b, t]
    count = jnp.sum(weights)
    return jnp.sum((logz - picked) * weights) / jnp.maximum(count, 1.0), count


def loss_fn(trained: Any, frozen: Any, batch: D.Batch, key: Optional[jax.Array], config: BlueLMConfig,
            tc: TrainConfig, compute_dtype) -> tuple[jax.Array, jax.Array]:
    """(loss, target count) of one batch. Full fine-tuning: `trained` is the params, `frozen` {}.
    LoRA: `trained` the adapters, `frozen` the base params; `key` drives LoRA dropout (None: off)."""
    if tc.lora is None:
        params, adapters = trained, None
    else:
        params, adapters = frozen, L.as_adapters(trained, tc.lora, key)
    inputs = jnp.asarray(batch.inputs)
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    logits, _ = forward(params, inputs, positions, config, compute_dtype=compute_dtype, adapters=adapters,
                        remat=tc.remat)
    return masked_cross_entropy(logits, batch.targets, batch.weights)


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to learning_rate, then cosine decay to min_lr_ratio * learning_rate."""
    warmup = min(tc.warmup_steps, tc.max_steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, warmup, max(tc.max_steps, warmup + 1),
                                              end_value=tc.learning_rate * tc.min_lr_ratio)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Clip -> AdamW (decay on matrices only) on the schedule; MultiSteps for accumulation."""
    decay_mask = lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)  # noqa: E731
    tx = optax.adamw(learning_rate_schedule(tc), tc.adam_b1, tc.adam_b2, weight_decay=tc.weight_decay,
                     mask=decay_mask)
    if tc.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(tc.max_grad_norm), tx)
    if tc.grad_accum > 1:
        tx = optax.MultiSteps(tx, tc.grad_accum)
    return tx


def abstract_state(config: BlueLMConfig, tc: TrainConfig, mesh: jax.sharding.Mesh) -> TrainState:
    """The train state as ShapeDtypeStructs carrying their NamedShardings: the jit shardings
    of the step and the target of an Orbax restore. Full fine-tuning: params by
    sharding.param_shardings; LoRA: adapters replicated. Optimizer state: see mirror_shardings."""
    replicated = NamedSharding(mesh, PS())
    if tc.lora is None:
        from bluelm_jax.checkpoint import abstract_params

        trained = abstract_params(config, jnp.float32, S.param_shardings(config, mesh))
    else:
        shapes = jax.eval_shape(lambda: L.init(jax.random.key(0), config, tc.lora))
        trained = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)
    opt_state = mirror_shardings(jax.eval_shape(make_optimizer(tc).init, trained), trained, replicated)
    return TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), trained, opt_state)


def mirror_shardings(opt_state: Any, trained: Any, other: NamedSharding) -> Any:
    """`opt_state` (ShapeDtypeStructs) with shardings: a leaf that mirrors a trained leaf (same
    trailing dict keys and shape: Adam mu/nu[...]["self_attn"]["q_proj"]["kernel"], MultiSteps' accumulated
    gradients) gets that leaf's sharding; the rest (step counts) `other`."""
    twins = {_dict_keys(path): x for path, x in jax.tree_util.tree_flatten_with_path(trained)[0]}

    def place(path, x):
        twin = twins.get(_dict_keys(path))
        sharding = twin.sharding if twin is not None and twin.shape == x.shape else other
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(place, opt_state)


def _dict_keys(path) -> tuple:
    """The trailing dict keys of a key path: .mu['lm_head']['kernel'] -> ("lm_head", "kernel")."""
    keys: list = []
    for key in reversed(path):
        if not isinstance(key, jax.tree_util.DictKey):
            break
        keys.append(key.key)
    return tuple(reversed(keys))


def shardings_of(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


def frozen_shardings(config: BlueLMConfig, tc: TrainConfig, mesh: jax.sharding.Mesh) -> Any:
    """Full fine-tuning: {} (nothing frozen); LoRA: the base params by sharding.param_shardings."""
    return {} if tc.lora is None else S.param_shardings(config, mesh)


def init_state(model, tc: TrainConfig, mesh: jax.sharding.Mesh) -> TrainState:
    """A fresh train state for `model` (.config, .params), placed by `abstract_state`."""
    shardings = shardings_of(abstract_state(model.config, tc, mesh))
    if tc.lora is None:
        # placed, then copied (keeping the sharding): the state is donated to the step, the model's
        # arrays must survive (device_put may hand back the model's own buffer for a shard)
        trained = jax.tree.map(lambda x, s: jnp.array(jax.device_put(x, s), jnp.float32, copy=True),
                               model.params, shardings.params)
    else:
        trained = jax.device_put(L.init(jax.random.fold_in(jax.random.key(tc.seed), 1), model.config, tc.lora),
                                 shardings.params)
    opt_state = jax.jit(make_optimizer(tc).init, out_shardings=shardings.opt_state)(trained)
    return TrainState(jax.device_put(jnp.zeros((), jnp.int32), shardings.step), trained, opt_state)


def frozen_params(model, tc: TrainConfig, mesh: jax.sharding.Mesh) -> Any:
    """What the step reads but does not train: {} or (LoRA) the base params, sharded."""
    return {} if tc.lora is None else S.shard_params(model.params, model.config, mesh)


def _on_mesh(fn: Callable, mesh: jax.sharding.Mesh) -> Callable:
    """`fn` called with `mesh` ambient (the model's activation constraints read it)."""

    @functools.wraps(fn)
    def call(*args):
        with S.use(mesh):
            return fn(*args)

    return call


@functools.lru_cache(maxsize=8)
def make_train_step(config: BlueLMConfig, tc: TrainConfig, compute_dtype, mesh: jax.sharding.Mesh) -> Callable:
    """jitted (state, frozen, batch) -> (state, metrics) on `mesh`: state in and out as
    `abstract_state`, frozen as `frozen_shardings`, batch rows split, metrics replicated; the
    state is donated. Cached: runs with the same settings in one process (resume, notebooks)
    reuse the compiled step."""
    tx, schedule = make_optimizer(tc), learning_rate_schedule(tc)
    dropout = tc.lora is not None and tc.lora.dropout > 0

    def step(state: TrainState, frozen, batch: D.Batch):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(tc.seed), 2), state.step) if dropout else None
        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, frozen, batch, key, config, tc, compute_dtype)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "tokens": count, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state.step // tc.grad_accum)}
        return TrainState(state.step + 1, params, opt_state), metrics

    state = shardings_of(abstract_state(config, tc, mesh))
    rows, replicated = S.batch_sharding(mesh, tc.batch_size), NamedSharding(mesh, PS())
    return _on_mesh(jax.jit(step, in_shardings=(state, frozen_shardings(config, tc, mesh), rows),
                            out_shardings=(state, replicated), donate_argnums=(0,)), mesh)


@functools.lru_cache(maxsize=8)
def make_eval_step(config: BlueLMConfig, tc: TrainConfig, compute_dtype, mesh: jax.sharding.Mesh) -> Callable:
    """jitted (trained, frozen, batch) -> (loss, count) on `mesh`, no dropout."""
    trained = shardings_of(abstract_state(config, tc, mesh).params)
    return _on_mesh(jax.jit(lambda trained, frozen, batch: loss_fn(trained, frozen, batch, None, config, tc,
                                                                  compute_dtype),
                            in_shardings=(trained, frozen_shardings(config, tc, mesh),
                                          S.batch_sharding(mesh, tc.batch_size)),
                            out_shardings=NamedSharding(mesh, PS())), mesh)


def evaluate(eval_step: Callable, trained, frozen, batches: list, put: Callable = lambda b: b) -> float:
    """Token-weighted mean loss over `batches`."""
    total, count = 0.0, 0.0
    for batch in batches:
        loss, n = jax.device_get(eval_step(trained, frozen, put(batch)))
        total, count = total + float(loss) * float(n), count + float(n)
    return total / max(count, 1.0)


# ------------------------------------------------------------------ saving


def save_model(directory: str, config: BlueLMConfig, tokenizer, params: dict, dtype: Any,
               config_source: Optional[str] = None) -> str:
    """Writes a converted bluelm-jax directory (checkpoint.write_converted_dir), replacing one there.

    config_source: a config.json whose extra keys are kept (else config.to_hf_dict())."""
    from bluelm_jax import checkpoint

    name = checkpoint.dtype_name(dtype)
    base = None
    if config_source and os.path.isfile(config_source):
        with open(config_source, encoding="utf-8") as f:
            base = json.load(f)
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)).astype(jnp.dtype(name)), params)
    return checkpoint.write_converted_dir(
        directory, lambda params_dir: checkpoint.save_params(params_dir, host), config.to_hf_json(name, base),
        tokenizer.serialized_model, name, force=True, num_parameters=config.num_parameters(),
        source_format="bluelm-jax-train")


def _checkpoint_manager(out_dir: str, tc: TrainConfig):
    import orbax.checkpoint as ocp

    # cleanup_tmp_directories: a save cut short by an interrupt leaves an unfinished step directory
    options = ocp.CheckpointManagerOptions(max_to_keep=tc.keep_checkpoints, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(out_dir), "checkpoints"), options=options)


def _restore(manager, step: int, abstract: TrainState) -> tuple[TrainState, D.Position]:
    """The state of checkpoint `step`, each array placed by the sharding of its `abstract` leaf.

    On failure the manager is closed and a ValueError names the checkpoint."""
    import orbax.checkpoint as ocp

    from bluelm_jax.checkpoint import finishing_orbax_tasks, root_cause

    try:
        with finishing_orbax_tasks():
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
        manager.close()  # the run ends here: no background work may outlive it
        raise ValueError(f"{manager.directory}/{step}: cannot resume, the checkpoint is damaged or does not match "
                         f"these settings ({root_cause(e)}); delete it or start over with --no-resume") from None
    pos = restored["data"]["position"]
    return TrainState(*restored["state"]), D.Position(int(pos["epoch"]), int(pos["index"]))


def _save(manager, step: int, state: TrainState, position: D.Position) -> None:
    """Saves checkpoint `step` and waits until it is written."""
    import orbax.checkpoint as ocp

    from bluelm_jax.checkpoint import finishing_orbax_tasks

    with finishing_orbax_tasks():
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"position": dataclasses.asdict(position), "step": step})))
        manager.wait_until_finished()


# ------------------------------------------------------------------ the loop


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def train(model, train_file: str, tc: TrainConfig, out_dir: Optional[str] = None, eval_file: Optional[str] = None,
          callback: Optional[Callable[[dict], None]] = None, progress: bool = True, resume: bool = True,
          log: Callable[[str], None] = print, warn: Callable[[str], None] = print_to_stderr) -> TrainResult:
    """Fine-tunes `model` (from bluelm_jax.load: .config, .tokenizer, .params) on `train_file`.

    log receives the progress lines, warn the bad records skipped with skip_bad_lines.

    callback(record) is called after every optimizer step (it may raise to stop the run).
    With `out_dir`: checkpoints every save_steps (resumed from when present and `resume`),
    the log, and the final model/adapter. Raises data.DataError on bad data.
    """
    config, tok = model.config, model.tokenizer
    require_kernel_layout(model.params, "fine-tuning")
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} pieces, the model only {config.vocab_size} rows")
    pad = config.pad_token_id
    train_ds = D.load_dataset(train_file, tok, tc.seq_len, tc.data, tc.skip_bad_lines)
    eval_ds = D.load_dataset(eval_file, tok, tc.seq_len, tc.data, tc.skip_bad_lines) if eval_file else None
    for ds in (train_ds, eval_ds):
        if ds is not None and ds.skipped:
            warn(f"skipped {len(ds.skipped)} bad record(s) of {ds.path}; first: {ds.skipped[0]}")
    compute_dtype = jnp.dtype(tc.compute_dtype) if tc.compute_dtype else default_compute_dtype()

    mesh = S.batch_mesh(tc.mesh, tc.batch_size)
    rows = S.batch_sharding(mesh, tc.batch_size)
    put = lambda batch: S.put_batch(batch, rows)  # noqa: E731
    frozen = frozen_params(model, tc, mesh)
    step_fn = make_train_step(config, tc, compute_dtype, mesh)
    eval_fn = make_eval_step(config, tc, compute_dtype, mesh)
    eval_set = D.eval_batches(eval_ds, tc.batch_size, tc.seq_len, pad) if eval_ds else None

    manager = _checkpoint_manager(out_dir, tc) if out_dir and tc.save_steps else None
    position, resumed_from = D.Position(), None
    if manager is not None and resume and manager.latest_step() is not None:
        resumed_from = int(manager.latest_step())
        state, position = _restore(manager, resumed_from, abstract_state(config, tc, mesh))
        log(f"resumed from {manager.directory}/{resumed_from} (data epoch {position.epoch}, batch {position.index})")
    else:
        if manager is not None:  # starting over: an old run's steps would block (and later shadow) ours
            for old_step in manager.all_steps():
                manager.delete(old_step)
        state = init_state(model, tc, mesh)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    log_file = (open(os.path.join(out_dir, "train_log.jsonl"), "a" if resumed_from is not None else "w",
                     encoding="utf-8") if out_dir else None)

    history: list = []
    eval_loss = None
    first = int(state.step) // tc.grad_accum
    stream = D.batches(train_ds, tc.batch_size, tc.seq_len, pad, tc.seed, start=position)
    from tqdm.auto import tqdm

    bar = tqdm(total=tc.max_steps, initial=first, desc="finetune", disable=not progress, dynamic_ncols=True)
    try:
        for step in range(first + 1, tc.max_steps + 1):
            t0 = time.perf_counter()
            losses, tokens, padded = [], 0.0, 0
            for _ in range(tc.grad_accum):
                position, batch = next(stream)
                state, metrics = step_fn(state, frozen, put(batch))
                m = jax.device_get(metrics)
                losses.append(float(m["loss"]))
                tokens += float(m["tokens"])
                padded += batch.inputs.size
            seconds = time.perf_counter() - t0
            record = {"step": step, "loss": float(np.mean(losses)), "lr": float(m["lr"]),
                      "grad_norm": float(m["grad_norm"]), "tokens": int(tokens),
                      "tokens_per_s": padded / seconds, "seconds": seconds}
            if eval_set and tc.eval_steps and step % tc.eval_steps == 0 and step != tc.max_steps:
                record["eval_loss"] = eval_loss = evaluate(eval_fn, state.params, frozen, eval_set, put)
            if step == tc.max_steps and eval_set:
                record["eval_loss"] = eval_loss = evaluate(eval_fn, state.params, frozen, eval_set, put)
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
            if log_file:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if step % tc.log_steps == 0 or step == tc.max_steps or "eval_loss" in record:
                extra = f" eval_loss {record['eval_loss']:.4f}" if "eval_loss" in record else ""
                (bar.write if progress else log)(
                    f"step {step}/{tc.max_steps} loss {record['loss']:.4f} lr {record['lr']:.3e} "
                    f"{record['tokens_per_s']:.0f} tokens/s{extra}")
            if manager is not None and (step % tc.save_steps == 0 or step == tc.max_steps):
                _save(manager, step, state, position)
            if callback is not None:
                callback(record)
    finally:
        bar.close()
        if log_file:
            log_file.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()

    trained = jax.tree.map(S.to_host, state.params)  # gathers the shards
    model_dir = adapter_dir = None
    if out_dir:
        source = os.path.join(getattr(model, "path", "") or "", "config.json")
        dtype = jnp.dtype(jax.tree.leaves(model.params)[0].dtype)
        if tc.lora is None:
            model_dir = save_model(os.path.join(out_dir, "model"), config, tok, trained, dtype, source)
        else:
            adapter_dir = os.path.join(os.path.abspath(out_dir), "adapter")
            L.save(adapter_dir, trained, tc.lora, base_model=os.path.abspath(getattr(model, "path", "") or ""))
            if tc.merge_lora:
                merged = L.merge(model.params, trained, tc.lora)
                model_dir = save_model(os.path.join(out_dir, "model"), config, tok, merged, dtype, source)
    return TrainResult(trained, history, eval_loss, model_dir, adapter_dir, list(train_ds.skipped), resumed_from)

