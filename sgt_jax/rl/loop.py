"""The Unified-GRPO run: ``RLProgram`` (the static program: shapes, shardings, one jitted step per
stage) and ``train`` (the loop: checkpoints, resume, metrics, EMA; docs/rl.md).

One step, all on device in one jitted program (``rl_step``): the B input images' und contexts
(packed on the host) -> G captions per image sampled with per-token log-probs -> then per stage

  ``und``                  t2i from every caption (flow sampling with CFG, VAE decode) -> reward
                           cos(f(x), f(x_hat)) -> group advantages -> ``updates_per_batch`` GRPO
                           updates of the trainable (und-side) parameters;
  ``gen`` / ``cold_start`` one flow-matching update on (caption -> input image) rows.

The state is the trainer's ``TrainState`` (params = the whole Bagel, so a stage change keeps one
optimizer state; a stage's frozen parameters get zero gradient and zero update), the constants
the trainer's ``Consts`` with ``frozen = {"ref": reference policy, "reward": reward encoder}``,
so ``train.checkpoint.Checkpointer`` saves and restores the run as it does a training run. Every
random draw derives from (train.seed, step) and the scenes from (rl.scene_seed, step): a resumed
run repeats the same rollouts and updates.
"""
from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sgt_jax import fileio
from sgt_jax.data.synthetic import make_scene
from sgt_jax.infer import context as ctx_lib
from sgt_jax.infer.image import FlowConfig
from sgt_jax.models.bagel import Bagel
from sgt_jax.models.clip import VitConfig
from sgt_jax.models.config import validate as validate_model
from sgt_jax.models.vae import AutoEncoder
from sgt_jax.parallel import mesh as mesh_lib
from sgt_jax.rl import grpo as grpo_lib
from sgt_jax.rl import rewards as rewards_lib
from sgt_jax.rl import rollout as ro
from sgt_jax.rl.config import parse_stages, stage_at, validate
from sgt_jax.train import metrics as metrics_lib
from sgt_jax.train.checkpoint import Checkpointer, config_json
from sgt_jax.train.loop import CompileCounter, vae_dtype
from sgt_jax.train.optimizer import copy_init_moe, ema_update, make_tx, schedule
from sgt_jax.train.step import Consts, TrainState, encode_images

log = logging.getLogger("sgt_jax.rl")

_COMPILES = CompileCounter()


def compile_count(prefix: str = "rl_step") -> int:
    return sum(v for k, v in _COMPILES.by_name.items() if prefix in k)


def _names(kp) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in kp)


def is_und_side(path: tuple) -> bool:
    """The encoder (understanding) side of BAGEL: ViT, connector, token embeddings, the und expert,
    its final norm and the LM head. Everything else (gen expert, norm_gen, time / latent
    embedders, llm2vae) is the decoder side."""
    return (path[0] in ("vit_model", "connector") or path[:2] in (("language_model", "embed_tokens"),
            ("language_model", "norm"), ("language_model", "lm_head"))
            or path[:3] == ("language_model", "layers", "und"))


def trainable(stage: str, train_vit: bool = True):
    """The parameters a stage trains (path -> bool); ``train_vit=False`` keeps the ViT frozen in
    the und / cold-start stages (UAE trains the LLM)."""
    vit_ok = lambda p: train_vit or p[0] != "vit_model"
    if stage == "und":
        return lambda p: is_und_side(p) and vit_ok(p)
    if stage == "gen":
        return lambda p: not is_und_side(p)
    return vit_ok


def mask_tree(tree, keep):
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: x if keep(_names(kp)) else jnp.zeros_like(x), tree)


def scenes(seed: int, index: int, n: int, size: int, num_shapes=(1, 3)) -> np.ndarray:
    """n synthetic scenes (uint8 (n, size, size, 3)) of stream ``seed``, batch ``index``."""
    rng = np.random.default_rng([int(seed), int(index)])
    lo, hi = int(num_shapes[0]), int(num_shapes[1])
    return np.stack([make_scene(rng, size, size, int(rng.integers(lo, hi + 1)))["image"] for _ in range(n)])


def build_encoder(kind: str, path: str, vit: dict, model_cfg, image_size: int, seed: int, init_scale: float = 0.0,
                  init: bool = True):
    """The reward / evaluation encoder: from an HF checkpoint dir (``init=False``: shapes only), or
    random with the ``vit`` shape (tiny runs)."""
    if path:
        return rewards_lib.load_encoder(kind, path, model_cfg=model_cfg, image_size=image_size, init=init)
    v = dict(vit)
    if kind == "dinov2":
        from sgt_jax.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD
        v.update(projection_dim=0, hidden_act="gelu", layer_norm_eps=1e-6, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    enc = rewards_lib.random_encoder(kind, seed=seed, config=VitConfig(**v), model_cfg=model_cfg,
                                     image_size=v["image_size"])
    return rewards_lib.rescale_random(enc, init_scale, seed=seed) if init_scale else enc


class RLProgram:
    def __init__(self, cfg, mesh=None, *, tokenizer=None):
        validate_model(cfg.model)
        validate(cfg)
        self.cfg = cfg
        r, t = cfg.rl, cfg.train
        self.stages = parse_stages(r.stages)
        self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(cfg.mesh.to_dict())
        self.tx = make_tx(t)
        self.tokenizer = tokenizer
        self.special = tokenizer.special if tokenizer is not None else ctx_lib.special_tokens(cfg.model)
        self.prompt_ids = (tokenizer.encode(r.prompt) if tokenizer is not None else list(r.get("prompt_ids", [])))
        if not self.prompt_ids:
            raise ValueError("rl: no prompt: give rl.tokenizer_path (to encode rl.prompt) or rl.prompt_ids")
        self.rc = ro.RolloutConfig(
            group_size=r.group_size, max_caption_tokens=r.max_caption_tokens, temperature=r.temperature,
            top_k=r.top_k, top_p=r.top_p, image_size=r.image_size,
            flow=FlowConfig(num_timesteps=r.num_timesteps, timestep_shift=r.timestep_shift,
                            cfg_text_scale=r.cfg_text_scale, cfg_img_scale=r.cfg_img_scale,
                            cfg_interval=tuple(r.cfg_interval), cfg_renorm_type=r.cfg_renorm_type,
                            cfg_renorm_min=r.cfg_renorm_min))
        self.gc = grpo_lib.GRPOConfig(group_size=r.group_size, clip_eps_low=r.clip_eps_low,
                                      clip_eps_high=r.clip_eps_high, kl_beta=r.kl_beta, std_eps=r.std_eps,
                                      reduction=r.reduction, scale_by_std=r.scale_by_std)
        self.rows = r.images_per_step * r.group_size
        self.grid = self.rc.latent_grid(cfg.model)

        abstract = nnx.eval_shape(lambda: Bagel(cfg.model, rngs=nnx.Rngs(0), rules=mesh_lib.RULES))
        self.graphdef, a_params, a_fixed = nnx.split(abstract, nnx.Param, ...)
        vae_abs = nnx.eval_shape(lambda: AutoEncoder(cfg.model, rngs=nnx.Rngs(0), dtype=vae_dtype(cfg)))
        self.vae_graphdef, a_vae = nnx.split(vae_abs, nnx.Param)
        enc_abs = nnx.eval_shape(lambda: self._encoder(r.reward_encoder, r.reward_path, init=False))
        self.enc_graphdef, a_enc = nnx.split(enc_abs, nnx.Param)
        a_opt = jax.eval_shape(self.tx.init, a_params)
        sh = lambda tree: mesh_lib.state_shardings(tree, self.mesh)
        rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        self.abstract_state = TrainState(step=scalar, params=a_params, opt_state=a_opt, ema=a_params,
                                         nan_streak=scalar, nan_total=scalar)
        self.state_shardings = TrainState(step=rep, params=sh(a_params), opt_state=sh(a_opt), ema=sh(a_params),
                                          nan_streak=rep, nan_total=rep)
        self.abstract_consts = Consts(frozen={"ref": a_params, "reward": a_enc}, fixed=a_fixed, vae=a_vae)
        self.consts_shardings = Consts(*(sh(v) for v in self.abstract_consts))
        self.step_fns = {name: jax.jit(self._make_step(name), donate_argnums=(0,),
                                       out_shardings=(self.state_shardings, rep))
                         for name in {s for s, _ in self.stages}}
        self._rl_eval = self._make_eval()
        self._evals = {}

    # -- pieces --------------------------------------------------------------------------------

    def _encoder(self, kind: str, path: str, init: bool = True):
        r = self.cfg.rl
        return build_encoder(kind, path, r.reward_vit.to_dict(), self.cfg.model, r.reward_vit.image_size,
                             seed=self.cfg.train.seed + 7, init_scale=r.reward_init_scale, init=init)

    def contexts(self, images: np.ndarray, group_size: int | None = None) -> ctx_lib.ContextBatch:
        g = self.rc.group_size if group_size is None else group_size
        ctx = ro.caption_contexts(images, self.prompt_ids, self.cfg.rl.vit_image_size, g)
        return ctx_lib.pack_contexts(self.cfg.model, ctx, special=self.special)

    def step_inputs(self, step: int):
        r = self.cfg.rl
        images = scenes(r.scene_seed, step, r.images_per_step, r.image_size, r.num_shapes)
        cb = self.contexts(images)
        return cb.batch, cb.n_valid, cb.rope_end, images

    def _make_step(self, stage: str):
        cfg, rc, gc, special = self.cfg, self.rc, self.gc, self.special
        r, t = cfg.rl, cfg.train
        gd, vgd, egd, tx = self.graphdef, self.vae_graphdef, self.enc_graphdef, self.tx
        G, rows, mu = r.group_size, self.rows, int(r.updates_per_batch) if stage == "und" else 1
        keep = trainable(stage, bool(r.train_vit))
        hw = self.grid * self.grid
        vit_dim = 3 * cfg.model.vit.patch_size ** 2

        def rl_step(state: TrainState, consts: Consts, ctx_batch, n_valid, rope_end, images):
            key = jax.random.fold_in(jax.random.key(t.seed), state.step)
            k_roll, k_shuffle, k_vae, k_noise, k_t = jax.random.split(key, 5)
            keys = jax.vmap(lambda i: jax.random.fold_in(k_roll, i))(jnp.arange(rows))
            model = nnx.merge(gd, state.params, consts.fixed)
            out = jax.lax.stop_gradient(ro.sample_captions(model, ctx_batch, n_valid, rope_end, keys, rc, special))
            mask = ro.caption_mask(out)
            extra = {}
            if stage == "und":
                vae = nnx.merge(vgd, consts.vae)
                enc = nnx.merge(egd, consts.frozen["reward"])
                # the flow noise of a group is shared (common random numbers): reward differences within a
                # group come from the captions, not from the image noise
                nkeys = keys if not r.shared_group_noise else jnp.repeat(keys[::G], G, axis=0)
                recon = ro.generate_images(model, vae, out["tokens"], out["num_tokens"], nkeys, rc, special)
                ref_emb = jnp.repeat(enc.encode(images), G, axis=0)
                rew = jnp.sum(ref_emb * enc.encode(recon), axis=-1)
                used = jax.random.permutation(k_shuffle, rew) if r.shuffle_rewards else rew
                adv = grpo_lib.group_advantages(used, G, std_eps=gc.std_eps, scale_by_std=gc.scale_by_std)
                lp_args = (ctx_batch, rope_end, out["tokens"], mask, special.bos_token_id)
                ref_lp = None
                if gc.kl_beta:
                    ref_model = nnx.merge(gd, consts.frozen["ref"], consts.fixed)
                    ref_lp = jax.lax.stop_gradient(ro.policy_logprobs(ref_model, *lp_args))
                old_lp = None if mu == 1 else jax.lax.stop_gradient(ro.policy_logprobs(model, *lp_args))

                def loss_fn(params):
                    lp = ro.policy_logprobs(nnx.merge(gd, params, consts.fixed), *lp_args)
                    old = jax.lax.stop_gradient(lp) if old_lp is None else old_lp
                    return grpo_lib.grpo_loss(lp, old, ref_lp, adv, mask, gc)

                grp = rew.reshape(-1, G)
                extra = {"reward_mean": jnp.mean(rew), "reward_std": jnp.mean(jnp.std(grp, axis=1)),
                         "reward_max": jnp.mean(jnp.max(grp, axis=1))}
            else:
                raw_t = jax.random.normal(k_t, (rows,), jnp.float32)
                imgs = jnp.repeat(images, G, axis=0)
                batch = ro.recon_batch(cfg.model, out["tokens"], out["num_tokens"], imgs, raw_t, special, vit_dim)
                lat = encode_images(vgd, consts.vae, batch.vae_images, k_vae, jnp.arange(rows))
                batch = batch.replace(latents=lat, vae_images=None)

                def loss_fn(params):
                    o = nnx.merge(gd, params, consts.fixed)(batch, num_gen=hw, key=k_noise)
                    mse = jnp.sum(jnp.mean(o["mse"], axis=-1)) / jnp.maximum(jnp.sum(batch.mse_mask), 1)
                    return mse, {"mse": mse}

            params, opt_state = state.params, state.opt_state
            losses, auxes, norms = [], [], []
            for _ in range(mu):
                (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
                grads = mask_tree(grads, keep)
                norms.append(optax.global_norm(grads))
                updates, opt_state = tx.update(grads, opt_state, params)
                params = optax.apply_updates(params, mask_tree(updates, keep))
                losses.append(loss)
                auxes.append(aux)
            loss, grad_norm = jnp.mean(jnp.stack(losses)), jnp.max(jnp.stack(norms))
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            sel = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
            ema = ema_update(state.ema, params, t.ema_decay)
            new = TrainState(step=state.step + 1, params=sel(params, state.params),
                             opt_state=sel(opt_state, state.opt_state), ema=sel(ema, state.ema),
                             nan_streak=jnp.where(ok, 0, state.nan_streak + 1),
                             nan_total=state.nan_total + (~ok).astype(jnp.int32))
            m = {"loss": loss, "grad_norm": grad_norm, "skipped": ~ok,
                 "lr": schedule(t)(state.step - state.nan_total),
                 "caption_len": jnp.mean(out["num_tokens"].astype(jnp.float32)),
                 "caption_stopped": jnp.mean(out["stopped"].astype(jnp.float32)), **extra}
            for k in auxes[0]:
                m[k] = jnp.mean(jnp.stack([a[k] for a in auxes]))
            return new, m

        rl_step.__name__ = f"rl_step_{stage}"
        return rl_step

    def _make_eval(self):
        rc, special = self.rc, self.special
        gd, vgd = self.graphdef, self.vae_graphdef

        def rl_eval(params, consts, encoders, ctx_batch, n_valid, rope_end, images, keys):
            """Held-out reconstruction: one sampled caption per row -> image -> cos per encoder."""
            model = nnx.merge(gd, params, consts.fixed)
            out = ro.sample_captions(model, ctx_batch, n_valid, rope_end, keys, rc, special)
            recon = ro.generate_images(model, nnx.merge(vgd, consts.vae), out["tokens"], out["num_tokens"],
                                       keys, rc, special)
            n = recon.shape[0] // images.shape[0]
            res = {}
            for name, (egd, ep) in encoders.items():
                enc = nnx.merge(egd, ep)
                res[name] = jnp.sum(jnp.repeat(enc.encode(images), n, axis=0) * enc.encode(recon), axis=-1)
            return res, out["num_tokens"], recon

        return rl_eval

    def eval_function(self, encoders: dict):
        """The jitted held-out evaluation for a set of encoders (name -> (graphdef, params))."""
        names = tuple(sorted(encoders))
        if names not in self._evals:
            gds = {k: encoders[k][0] for k in names}

            def rl_eval(params, consts, enc_params, *a):
                return self._rl_eval(params, consts, {k: (gds[k], enc_params[k]) for k in names}, *a)

            self._evals[names] = jax.jit(rl_eval)
        return self._evals[names]

    # -- state ---------------------------------------------------------------------------------

    def init(self):
        cfg, t = self.cfg, self.cfg.train

        def make():
            model = Bagel(cfg.model, rngs=nnx.Rngs(t.seed), rules=mesh_lib.RULES)
            if t.copy_init_moe:
                copy_init_moe(nnx.state(model))
            _, params, fixed = nnx.split(model, nnx.Param, ...)
            vae = nnx.state(AutoEncoder(cfg.model, rngs=nnx.Rngs(t.seed + 1), dtype=vae_dtype(cfg)), nnx.Param)
            return params, fixed, vae

        with self.mesh:
            params, fixed, vae = jax.jit(make)()
            if t.init_from:
                params, vae = self._load_model_dir(t.init_from, params, vae)
            enc = nnx.state(self._encoder(cfg.rl.reward_encoder, cfg.rl.reward_path), nnx.Param)
            opt_state = jax.jit(self.tx.init)(params)
            copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
        z = lambda: jnp.zeros((), jnp.int32)
        state = TrainState(step=z(), params=params, opt_state=opt_state, ema=copy(params), nan_streak=z(), nan_total=z())
        consts = Consts(frozen={"ref": copy(params), "reward": enc}, fixed=fixed, vae=vae)
        return jax.device_put(state, self.state_shardings), jax.device_put(consts, self.consts_shardings)

    def fixed(self):
        def make():
            return nnx.split(Bagel(self.cfg.model, rngs=nnx.Rngs(0)), nnx.Param, ...)[2]
        with self.mesh:
            return jax.jit(make, out_shardings=self.consts_shardings.fixed)()

    def _load_model_dir(self, path, params, vae):
        from sgt_jax.convert.model_dir import load_model_dir

        sh = {"params": nnx.to_pure_dict(self.state_shardings.params), "vae": nnx.to_pure_dict(self.consts_shardings.vae)}
        _, pure, vae_pure = load_model_dir(path, shardings=sh)
        nnx.replace_by_pure_dict(params, pure)
        if vae_pure is not None:
            nnx.replace_by_pure_dict(vae, vae_pure)
        return params, vae

    def eval_encoders(self, consts) -> dict:
        """name -> (graphdef, params): the reward encoder and ``rl.eval_encoders``."""
        r = self.cfg.rl
        out = {r.reward_encoder: (self.enc_graphdef, consts.frozen["reward"])}
        for name in filter(None, str(r.eval_encoders).split(",")):
            if name in out:
                continue
            path = r.dinov2_path if name == "dinov2" else ""
            gd, p = nnx.split(self._encoder(name, path), nnx.Param)
            if name == "siglip":          # BAGEL's own SigLIP: the reference policy's (initial) ViT
                p["vit"] = consts.frozen["ref"]["vit_model"]
            out[name] = (gd, p)
        return out


def heldout_eval(program: RLProgram, params, consts, encoders=None) -> dict:
    """Mean reconstruction similarity over the held-out scenes (``rl.heldout_images``, stream
    ``rl.heldout_seed``), ``rl.eval_samples`` sampled captions per image at fixed keys:
    {encoder name: mean cos, "caption_len": mean}."""
    r = program.cfg.rl
    encoders = encoders or program.eval_encoders(consts)
    imgs = scenes(r.heldout_seed, 0, r.heldout_images, r.image_size, r.num_shapes)
    per = max(1, program.rows // max(r.eval_samples, 1))          # images per eval batch
    fn = program.eval_function(encoders)
    enc_params = {k: p for k, (_, p) in encoders.items()}
    sums, lens, n = {}, [], 0
    for i in range(0, len(imgs), per):
        real = imgs[i:i + per]
        chunk = np.concatenate([real, np.repeat(real[-1:], per - len(real), axis=0)])   # static shapes
        cb = program.contexts(chunk, group_size=r.eval_samples)
        keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.key(r.heldout_seed), j))(
            jnp.arange(i * r.eval_samples, (i + per) * r.eval_samples))
        res, ntok, _ = fn(params, consts, enc_params, cb.batch, jnp.asarray(cb.n_valid), jnp.asarray(cb.rope_end),
                          jnp.asarray(chunk), keys)
        keep = len(real) * r.eval_samples
        for k, v in res.items():
            sums[k] = sums.get(k, 0.0) + float(jnp.sum(v[:keep]))
        lens.append(np.asarray(ntok)[:keep])
        n += keep
    out = {k: v / n for k, v in sums.items()}
    out["caption_len"] = float(np.mean(np.concatenate(lens)))
    return out


def _host(m: dict) -> dict:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(m).items()}


def train(cfg, workdir: str, *, stop_after: int | None = None, quiet: bool = False, mesh=None,
          tokenizer=None, on_step=None) -> dict:
    """Run (or resume) the RL stages in ``workdir``; returns a summary (history of logged rows,
    held-out evaluations, compilations of the step functions inside the loop). ``on_step(step,
    state)``: called after each step's save (tests: fault injection)."""
    t, r = cfg.train, cfg.rl
    program = RLProgram(cfg, mesh, tokenizer=tokenizer)
    fileio.makedirs(workdir)
    ckpt = Checkpointer(fileio.join(workdir, "checkpoints"), save_every=t.save_every, keep=t.keep,
                        async_save=t.async_checkpointing)
    try:
        resumed = ckpt.restore_latest(program)
        if resumed is not None:
            state, consts = resumed.state, resumed.consts._replace(fixed=program.fixed())
            start = resumed.step
            log.info("resumed from step %d", start)
        else:
            state, consts = program.init()
            start = 0
    except BaseException:
        ckpt.close()
        raise
    writer = metrics_lib.MetricsWriter(workdir, t.steps, start, enabled=jax.process_index() == 0 and not quiet)
    meta = {"config": config_json(cfg)}
    end = t.steps if stop_after is None else min(t.steps, start + stop_after)
    history, evals, step, last_saved = [], [], start, start
    encoders = program.eval_encoders(consts) if r.eval_every else None

    def run_eval(s):
        if r.eval_every and (s % r.eval_every == 0 or s == t.steps):
            res = heldout_eval(program, state.params, consts, encoders)
            writer.write_eval(s, res)
            evals.append({"step": s, **res})
            log.info("step %d held-out %s", s, res)

    before = compile_count()
    try:
        if start == 0:
            run_eval(0)
        while step < end:
            stage = stage_at(program.stages, step)
            t0 = time.perf_counter()
            batch, n_valid, rope_end, images = program.step_inputs(step)
            state, m = program.step_fns[stage](state, consts, batch, jnp.asarray(n_valid), jnp.asarray(rope_end),
                                               jnp.asarray(images))
            step += 1
            ckpt.poll()
            if step % t.log_every == 0 or step == end:
                row = _host(m)
                row.update(stage=["cold_start", "und", "gen"].index(stage), step_time_s=time.perf_counter() - t0,
                           step_compiles=compile_count())
                writer.write(step, row)
                history.append({"step": step, **row})
            writer.advance()
            if ckpt.save(step, state, consts, {"step": step}, meta):
                last_saved = step
            run_eval(step)
            if on_step is not None:
                on_step(step, state)
        if step != last_saved:
            ckpt.save(step, state, consts, {"step": step}, meta, force=True)
    finally:
        ckpt.close()
        writer.close()
    return {"workdir": workdir, "steps": step, "history": history, "eval": evals,
            "compiles_in_loop": compile_count() - before, "metrics": writer.jsonl_path}
