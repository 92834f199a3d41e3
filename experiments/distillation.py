"""Distillation of the protocol's students, vectorised over seeds: the optimizer, the jitted step and its
compiled multi-step chunks, and `distil`, which trains every seed's copy of the student base on its traces
(passive, adaptive and the soft-target attacks alike) and returns them evaluated at their iterate average."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from experiments import attacker
from experiments.chunked import seed_rows_sharded
from experiments.config import ConfigError, DistillConfig
from experiments.iterate_average import IterateAverage, ema_update
from experiments.progress import tqdm  # tqdm's bar on a terminal, a line per 10% in a log file
from experiments.tasks.batches import trim_columns
from experiments.train import RoleModel, float32_moments, masked_nll
from game import students as stu
from models import lora
from models import sharding as shd
from models import transformer as tfm


def _student_logp(graphdef, params, tokens_bt):
    logits_btv, _ = tfm.forward(graphdef, params, tokens_bt[:, :-1])
    return jax.nn.log_softmax(logits_btv, axis=-1)


def distill_optimizer(dc: DistillConfig) -> optax.GradientTransformation:
    warmup = min(dc.warmup_steps, dc.steps - 1)
    if dc.schedule == "constant":
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, dc.lr, warmup), optax.constant_schedule(dc.lr)], [warmup]
        )
    else:
        schedule = optax.warmup_cosine_decay_schedule(0.0, dc.lr, warmup, dc.steps, dc.lr * 0.1)
    return float32_moments(optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.0))  # bf16 params: moments stay f32


@functools.lru_cache(maxsize=16)
def make_distill_step(graphdef, proxy_graphdef, dc: DistillConfig, kind: str, tau: float):
    """One student update over all seeds, jitted once per (model, settings, kind) and reused across defense
    settings (γ, β and the proxy's params are traced arguments, not constants)."""
    return jax.jit(_seeds_step(graphdef, proxy_graphdef, dc, kind, tau), donate_argnums=(0, 1))


@functools.lru_cache(maxsize=16)
def make_distill_chunk(graphdef, proxy_graphdef, dc: DistillConfig, kind: str, tau: float, mesh):
    """Many student updates in one compiled loop (`lax.scan`): the batch is gathered on the device from the
    device-resident traces by precomputed row indices, and the iterate average, the first non-finite step and
    the effective-sample-size sum are updated in the loop too. The same updates as calling `make_distill_step`
    once per step, without a host round trip per step (which cost a third of the time of a small student).
    carry = (trained, opt_state, average, first_bad_s, ess_s); xs = (idx_ksb, heldout_idx_ksh, step_k). Every chunk
    has FUSED_CHUNK steps, so it compiles once: steps from `end` on (a snapshot or the last step came first) are
    skipped by a `lax.cond`."""
    step = _seeds_step(graphdef, proxy_graphdef, dc, kind, tau)
    decay = jnp.float32(dc.ema)

    def rows_sharded(x):  # as seed_rows_sharded places a host batch
        div = shd.batch_divisor(mesh) if mesh is not None else 1
        if div == 1 or x.shape[1] % div:
            return x
        spec = PartitionSpec(None, shd.BATCH_AXES, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def chunk(carry, base, traces, heldout, xs, end, beta, proxy_params, gamma):
        def update(carry, x):
            trained, opt_state, avg, first_bad, ess = carry
            idx_sb, h_idx_sh, i = x
            batch = {
                k: rows_sharded(jnp.take_along_axis(v, idx_sb.reshape(idx_sb.shape + (1,) * (v.ndim - 2)), axis=1))
                for k, v in traces.items()
            }
            held = {k: rows_sharded(v[h_idx_sh]) for k, v in heldout.items()}
            trained, opt_state, loss, aux = step(trained, opt_state, base, batch, beta, held, proxy_params, gamma)
            if avg is not None:
                avg = ema_update(avg, trained, decay)
            first_bad = jnp.where((first_bad < 0) & ~jnp.isfinite(loss), i, first_bad)
            return trained, opt_state, avg, first_bad, ess + aux["ess_fraction"]

        def body(carry, x):
            return jax.lax.cond(x[2] < end, update, lambda c, _: c, carry, x), None

        return jax.lax.scan(body, carry, xs)[0]

    return jax.jit(chunk, donate_argnums=(0,))


def _seeds_step(graphdef, proxy_graphdef, dc: DistillConfig, kind: str, tau: float):
    """One student update vmapped over seeds (not jitted).
    `kind` is passive | adaptive | soft_topk | poe_inversion, or a `game.students.Recipe`
    (attacker.recipe_of resolves passive/adaptive to theirs; `stu.recipe_loss` assembles it).

    The trained tree `tp` is the student's params (finetune='full') or its LoRA adapters
    over the frozen `base` params (finetune='lora'; then example values and g_S are taken
    with respect to the adapters, the student's actual parameters)."""
    tx = distill_optimizer(dc)
    params_of = attacker.params_of_fn(dc)

    recipe = attacker.recipe_of(kind, dc)

    def loss_fn(tp, base, batch, beta, heldout, proxy_params, gamma):
        mask_bt = batch["loss_mask_bt"][:, :-1]
        if recipe is not None:  # passive and adaptive students: values, weights, averaging in one place

            def token_loss(p):
                return (-tfm.token_logprobs(graphdef, params_of(p, base), batch["tokens_bt"]), mask_bt)

            def held(p):
                return masked_nll(graphdef, params_of(p, base), heldout["tokens_bt"], heldout["loss_mask_bt"])

            return stu.recipe_loss(
                recipe,
                beta,
                token_loss,
                tp,
                heldout_loss_fn=held,
                weights_b=batch.get("weights_b"),
                shuffle_u_b=batch.get("shuffle_u_b"),
            )
        params = params_of(tp, base)
        target_lp = batch["topk_logprob_btk"][:, :-1]
        ids = batch["topk_ids_btk"][:, :-1]
        if kind == "poe_inversion":  # undo the mixture with the attacker's own copy of the proxy
            z_p, _ = tfm.forward(proxy_graphdef, proxy_params, batch["tokens_bt"][:, :-1])
            z_p_k = jnp.take_along_axis(z_p, ids, axis=-1)
            target_lp = stu.invert_poe(target_lp, z_p_k, gamma, tau)
        logp_btv = _student_logp(graphdef, params, batch["tokens_bt"])
        return stu.soft_target_loss(logp_btv, ids, target_lp, mask_bt, None, dc.averaging), {
            "ess_fraction": jnp.float32(1.0)
        }

    reverse_only = recipe is None or not recipe.weighted  # weighted recipes take example values with jax.jvp

    def step(tp, opt_state, base, batch, beta, heldout, proxy_params, gamma):
        with tfm.reverse_mode_only(reverse_only):  # attention's hand-written backward where nothing needs jvp
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                tp, base, batch, beta, heldout, proxy_params, gamma
            )
        updates, opt_state = tx.update(grads, opt_state, tp)
        return optax.apply_updates(tp, updates), opt_state, loss, aux

    # vmap over seeds: trained tree, opt state, batch and held-out batch have a leading seed axis; base is shared.
    return jax.vmap(step, in_axes=(0, 0, None, 0, None, 0, None, None))


FUSED_CHUNK = 100  # steps per compiled chunk (the last one of a run or before a snapshot may use fewer)
FUSED_MAX_BYTES = 256 * 2**20  # traces kept on the device for the fused loop (soft top-k targets can be large)


def distil(
    base: RoleModel,
    traces: dict[str, np.ndarray],
    heldout: dict[str, np.ndarray],
    dc: DistillConfig,
    kind: str,
    beta: float,
    seeds: int,
    proxy: RoleModel | None = None,
    gamma: float = 0.0,
    tau: float = 1.0,
    progress: bool = True,
    desc: str = "",
    snapshots: tuple[int, ...] = (),
    stats: dict | None = None,
    fused: bool | None = None,
):
    """Train `seeds` copies of the student base at once; traces have a leading seed axis.
    Returns the students' full params (LoRA adapters merged) with a leading seed axis; with
    `snapshots` (step counts), a list of them, one per snapshot, training to the largest.
    `stats` (if given) receives the per-seed mean effective-sample-size fraction of the weights.
    `fused` runs the steps in compiled chunks (`make_distill_chunk`); by default whenever the recipe needs no
    host work per batch and the traces fit FUSED_MAX_BYTES. Both paths draw the same batches."""
    step = make_distill_step(base.graphdef, proxy.graphdef if proxy else None, dc, kind, tau)
    traces, heldout = trim_columns(traces), trim_columns(heldout)
    proxy_params = proxy.params if proxy else None
    if dc.finetune == "lora":
        try:
            dc.lora.validate(base.cfg.n_layers, "protocol.distill.lora")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        keys = jax.random.split(jax.random.key(17), seeds)
        trained = jax.vmap(lambda k: lora.init_adapters(base.params, base.cfg, dc.lora, k))(keys)
        frozen = base.params
    else:

        def stack(x):
            return jnp.broadcast_to(x, (seeds,) + x.shape)

        trained, frozen = jax.tree.map(lambda x: jnp.array(stack(x)), base.params), None
    opt_state = jax.vmap(distill_optimizer(dc).init)(trained)
    # vmap's init leaves the step counters off the params' mesh; the step returns them on it. Place them there
    # up front so the first and later calls share one compiled step (otherwise the step compiles twice).
    mesh = getattr(jax.tree.leaves(base.params)[0].sharding, "mesh", None)
    if mesh is not None:

        def on_mesh(x):
            return (
                x
                if getattr(x.sharding, "mesh", None) == mesh
                else jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
            )

        opt_state = jax.tree.map(on_mesh, opt_state)
    n = traces["tokens_bt"].shape[1]
    n_h = heldout["tokens_bt"].shape[0]
    rngs = [np.random.default_rng([s, 17]) for s in range(seeds)]
    total = max(snapshots) if snapshots else dc.steps
    merged = (
        (lambda tp: jax.vmap(lambda t: lora.merge(base.params, t, dc.lora))(tp))
        if dc.finetune == "lora"
        else (lambda tp: tp)
    )
    kept = {}
    feeder = attacker.RecipeFeeder(base, dc, kind, traces, heldout, seeds)
    average = IterateAverage(dc.ema, trained)
    first_bad = jnp.full((seeds,), -1, jnp.int32)  # per seed, the first step whose loss was not finite
    ess = jnp.zeros((seeds,), jnp.float32)
    h_b = min(dc.heldout_batch, n_h)
    held_arrays = {k: heldout[k] for k in ("tokens_bt", "loss_mask_bt")}
    bar = tqdm(total=total, desc=desc, leave=False, disable=not progress)
    if fused is None:  # not when the feeder adds host-made weights or uniforms, or the traces are too large
        r = feeder.recipe
        host_extras = r is not None and r.weighted and (r.dataset_level or r.shuffle)
        fused = not host_extras and sum(v.nbytes for v in (*traces.values(), *held_arrays.values())) <= FUSED_MAX_BYTES
    if fused:
        chunk = make_distill_chunk(base.graphdef, proxy.graphdef if proxy else None, dc, kind, tau, mesh)
        traces_d, held_d = jax.tree.map(jnp.asarray, (traces, held_arrays))
        carry = (trained, opt_state, average.avg, first_bad, ess)
        ends = sorted({*range(FUSED_CHUNK, total, FUSED_CHUNK), *snapshots, total})
        i = 0
        for end in ends:
            k, size = end - i, FUSED_CHUNK  # rows k.. are padding the chunk skips
            idx_ksb, h_idx_ksh = (
                np.zeros((size, seeds, dc.batch_size), np.int32),
                np.zeros((size, seeds, h_b), np.int32),
            )
            for j in range(k):  # the same draws, in the same order, as the per-step loop below
                idx_ksb[j] = np.stack([r.integers(0, n, dc.batch_size) for r in rngs])
                h_idx_ksh[j] = np.stack([r.integers(0, n_h, h_b) for r in rngs])
            xs = (jnp.asarray(idx_ksb), jnp.asarray(h_idx_ksh), jnp.arange(i, i + size, dtype=jnp.int32))
            carry = chunk(
                carry, frozen, traces_d, held_d, xs, jnp.int32(end), jnp.float32(beta), proxy_params, jnp.float32(gamma)
            )
            trained, i = carry[0], end
            average.advanced(carry[2], k)
            if end in snapshots:  # a copy: the next chunk donates the carry
                kept[end] = jax.tree.map(jnp.copy, merged(average.value(trained)))
            bar.update(k)
        _, _, _, first_bad, ess = carry
    for i in range(0 if fused else total):
        idx = np.stack([r.integers(0, n, dc.batch_size) for r in rngs])
        batch = {
            k: np.take_along_axis(v, idx.reshape(idx.shape + (1,) * (v.ndim - 2)), axis=1) for k, v in traces.items()
        }
        batch.update(feeder.extras(i, trained, frozen, idx, beta))
        h_idx = np.stack([r.integers(0, n_h, h_b) for r in rngs])
        held = {k: v[h_idx] for k, v in held_arrays.items()}
        batch, held = seed_rows_sharded(batch, mesh), seed_rows_sharded(held, mesh)
        trained, opt_state, loss, aux = step(
            trained, opt_state, frozen, batch, jnp.float32(beta), held, proxy_params, jnp.float32(gamma)
        )
        ess = ess + aux["ess_fraction"]
        first_bad = _first_bad(first_bad, loss, i)
        average.update(trained)
        if i + 1 in snapshots:  # a copy: the next step donates `trained`
            kept[i + 1] = jax.tree.map(jnp.copy, merged(average.value(trained)))
        bar.update(1)
    bar.close()
    if stats is not None:
        stats["ess_fraction"] = (np.asarray(shd.to_host(ess)) / total).tolist()
    first_bad = shd.to_host(first_bad)
    if np.any(first_bad >= 0):
        s = int(np.argmax(first_bad >= 0))
        raise FloatingPointError(
            f"{desc}: the distillation loss of seed {s} stopped being finite at step {first_bad[s] + 1} "
            f"of {total}; lower protocol.distill.lr (now {dc.lr:g})"
        )
    return [kept[n] for n in snapshots] if snapshots else merged(average.value(trained))


@jax.jit
def _first_bad(first_bad_s, loss_s, i):
    return jnp.where((first_bad_s < 0) & ~jnp.isfinite(loss_s), i, first_bad_s)
