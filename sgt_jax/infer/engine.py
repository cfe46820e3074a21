"""``Engine``: a model ready for inference -- the Bagel and VAE state (sharded over a mesh by the
trainer's logical-axis rules), the tokenizer, the image transforms, and the jitted functions
of context.py / text.py / image.py over them.

    eng = Engine.load("MODEL_DIR_or_RUN_DIR")          # python -m sgt_jax.convert import / a run
    cache = eng.new_cache(rows, capacity)
    cache = eng.prefill(cache, eng.pack(contexts), keys)
    cache, out = eng.generate_text(cache, keys, max_new_tokens=64)
    latents = eng.sample_latents(cache, h, w, keys, FlowConfig(...))
    floats, uint8 = eng.decode_latents(latents, h, w)

Every jitted function is compiled once per static shape (rows, capacity bucket, block bucket,
latent grid, num_timesteps, ...); their names start with ``infer_`` (``compile_counts``).
Parameters are cast to ``param_dtype`` (default: the compute dtype, as BAGEL loads bf16 weights
for inference).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from sgt_jax import fileio
from sgt_jax.infer import context as ctx_lib
from sgt_jax.infer import image as image_lib
from sgt_jax.infer import text as text_lib
from sgt_jax.infer.cache import KVCache, cache_shardings, check_capacity
from sgt_jax.models.bagel import Bagel
from sgt_jax.models.config import validate
from sgt_jax.models.layers import sincos_2d_table
from sgt_jax.models.vae import AutoEncoder
from sgt_jax.parallel import mesh as mesh_lib
from sgt_jax.train.loop import CompileCounter



class CheckpointNotFound(FileNotFoundError):
    pass


ABSTRACT = object()      # Engine(cfg, ABSTRACT, ABSTRACT): weights as shapes only (Engine.abstract)


def _fixed_tables(cfg, abstract_fixed):
    """The sin-cos tables (regenerated from their formula, as everywhere)."""
    h, b = cfg.llm.hidden_size, cfg.bagel
    values = {"vit_pos_embed": lambda: sincos_2d_table(h, b.vit_max_num_patch_per_side),
              "latent_pos_embed": lambda: sincos_2d_table(h, b.max_latent_size)}
    pure = {k: jnp.asarray(values[k]()) for k in nnx.to_pure_dict(abstract_fixed)}
    nnx.replace_by_pure_dict(abstract_fixed, pure)
    return abstract_fixed


def default_mesh():
    return mesh_lib.make_mesh(dict(data=1, fsdp=-1, tensor=1))


class Engine:
    def __init__(self, cfg, params, vae_params=None, *, tokenizer=None, data_cfg=None, mesh=None,
                 param_dtype=None, query_chunk: int = 0, source: str = ""):
        """``params`` / ``vae_params``: pure dicts (``nnx.to_pure_dict`` of the Bagel / AutoEncoder
        Params, as a model dir stores them), numpy or jax arrays (already sharded or not)."""
        self.cfg = validate(cfg)
        self.mesh = mesh if mesh is not None else default_mesh()
        self.tokenizer = tokenizer
        self.source = source
        self.query_chunk = int(query_chunk)
        self.param_dtype = jnp.dtype(param_dtype or cfg.compute_dtype)
        from sgt_jax.infer.tasks import transforms_for

        self.data_cfg = data_cfg
        self.transforms = transforms_for(cfg, data_cfg)
        abstract = nnx.eval_shape(lambda: Bagel(cfg, rngs=nnx.Rngs(0)))
        self.graphdef, self._abstract_params, a_fixed = nnx.split(abstract, nnx.Param, ...)
        self.param_shardings = mesh_lib.state_shardings(self._abstract_params, self.mesh)
        rep = NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        vae_abs = nnx.eval_shape(lambda: AutoEncoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(cfg.compute_dtype)))
        self.vae_graphdef, self._abstract_vae = nnx.split(vae_abs, nnx.Param)
        self.vae_shardings = mesh_lib.state_shardings(self._abstract_vae, self.mesh)
        if params is ABSTRACT:          # shapes only: the jitted functions lower and compile, never run
            shape = lambda a, sh: jax.ShapeDtypeStruct(
                a.shape, self.param_dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype, sharding=sh)
            self.params = jax.tree.map(shape, self._abstract_params, self.param_shardings)
            self.fixed = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), a_fixed)
            self.has_vae = True
            self.vae_params = jax.tree.map(shape, self._abstract_vae, self.vae_shardings)
        else:
            self.fixed = jax.device_put(_fixed_tables(cfg, a_fixed), rep)
            self.set_weights(params, vae_params)
        self._build()

    def set_weights(self, params, vae_params=None):
        """New weights (pure dicts, as ``__init__`` takes them) for the same model: the jitted
        functions are kept (no recompilation; evaluation inside training swaps in each step's
        weights). Arrays already in ``param_dtype`` and sharded as the engine wants are used as
        they are, not copied."""
        cast = lambda x: jnp.asarray(x, self.param_dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x
        a_params = jax.tree.map(lambda x: x, self._abstract_params)
        nnx.replace_by_pure_dict(a_params, params)
        self.params = jax.device_put(jax.tree.map(cast, a_params), self.param_shardings)
        self.has_vae = vae_params is not None
        if self.has_vae:
            a_vae = jax.tree.map(lambda x: x, self._abstract_vae)
            nnx.replace_by_pure_dict(a_vae, vae_params)
            self.vae_params = jax.device_put(jax.tree.map(cast, a_vae), self.vae_shardings)
        else:
            self.vae_params = None

    @classmethod
    def abstract(cls, cfg, mesh, **kw) -> "Engine":
        """An engine whose weights are shapes only (``jax.ShapeDtypeStruct`` with their shardings):
        its jitted functions (``_prefill``, ``_velocity``, ...) can be lowered and compiled, e.g. for
        a TPU topology from a CPU host (bench/generate_aot.py), but not run."""
        return cls(cfg, ABSTRACT, ABSTRACT, mesh=mesh, **kw)

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: Bagel, vae: AutoEncoder | None = None, **kw) -> "Engine":
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        vparams = nnx.to_pure_dict(nnx.state(vae, nnx.Param)) if vae is not None else None
        return cls(model.cfg, params, vparams, **kw)

    @classmethod
    def load(cls, path: str, *, weights: str = "ema", mesh=None, param_dtype=None, tokenizer_path=None,
             compute_dtype=None, query_chunk: int = 0) -> "Engine":
        """From a model dir (``python -m sgt_jax.convert import`` / ``export``'s source) or a
        training run (RUN, RUN/checkpoints, RUN/checkpoints/<step>; ``weights``: "ema" or
        "params"). Raises ``CheckpointNotFound`` naming what was expected."""
        from sgt_jax.convert import model_dir as md
        from sgt_jax.data.tokenizer import Tokenizer
        from sgt_jax.train.export import find_checkpoint, restore_weights

        if not fileio.exists(path):
            raise CheckpointNotFound(f"{path}: no such file or directory (expected a model dir from "
                                     "`python -m sgt_jax.convert import` or a training run dir)")
        mesh = mesh if mesh is not None else default_mesh()
        tok_dir, data_cfg = None, None
        if fileio.exists(fileio.join(path, md.INFO_FILE)):
            cfg = md.read_config(path)
            if compute_dtype:
                cfg.compute_dtype = compute_dtype
            a = nnx.eval_shape(lambda: Bagel(cfg, rngs=nnx.Rngs(0)))
            sh = nnx.to_pure_dict(mesh_lib.state_shardings(nnx.state(a, nnx.Param), mesh))
            va = nnx.eval_shape(lambda: AutoEncoder(cfg, rngs=nnx.Rngs(0)))
            vsh = nnx.to_pure_dict(mesh_lib.state_shardings(nnx.state(va, nnx.Param), mesh))
            cfg, params, vae = md.load_model_dir(path, shardings={"params": sh, "vae": vsh},
                                                 dtype=param_dtype or (compute_dtype or cfg.compute_dtype))
            if compute_dtype:
                cfg.compute_dtype = compute_dtype
            t = fileio.join(path, md.TOKENIZER_DIR)
            tok_dir = t if fileio.isdir(t) else None
            source = f"model dir {path}"
        else:
            try:
                ckpt_dir, step = find_checkpoint(path)
            except (FileNotFoundError, NotADirectoryError) as e:
                raise CheckpointNotFound(
                    f"{path}: neither a model dir (no {md.INFO_FILE}; make one with `python -m "
                    "sgt_jax.convert import`) nor a training run with checkpoints "
                    f"(RUN/checkpoints/<step>/state): {e}") from None
            if weights not in ("ema", "params"):
                raise ValueError(f"weights={weights!r}: 'ema' or 'params'")
            run_cfg, params, vae = restore_weights(ckpt_dir, step, ema=weights == "ema", mesh=mesh)
            cfg = run_cfg.model
            if compute_dtype:
                cfg.compute_dtype = compute_dtype
            data_cfg = run_cfg.data
            init_from = run_cfg.train.get("init_from", "")
            cand = [fileio.join(init_from, "tokenizer")] if init_from else []
            cand.append(run_cfg.data.get("tokenizer_path", "").replace("{workdir}", fileio.dirname(ckpt_dir)))
            tok_dir = next((c for c in cand if c and fileio.isdir(c)), None)
            source = f"run {ckpt_dir}/{step} ({weights})"
        tok_dir = tokenizer_path or tok_dir
        tok = Tokenizer(tok_dir) if tok_dir else None
        return cls(cfg, params, vae, tokenizer=tok, data_cfg=data_cfg, mesh=mesh, param_dtype=param_dtype,
                   query_chunk=query_chunk, source=source)

    # -- jitted functions ----------------------------------------------------------------------

    def _build(self):
        gd, vgd = self.graphdef, self.vae_graphdef
        qc = self.query_chunk
        csh = lambda c: jax.lax.with_sharding_constraint(c, cache_shardings(c, self.mesh))
        rows = lambda a: jax.lax.with_sharding_constraint(a, self.row_sharding(a.shape))
        marks = (self.special.start_of_image, self.special.end_of_image)

        def infer_prefill(params, fixed, vae_params, cache, batch, eps, n_valid, rope_end, *, num_gen):
            model = nnx.merge(gd, params, fixed)
            vae = nnx.merge(vgd, vae_params) if num_gen else None
            cache, h = ctx_lib.prefill(model, vae, cache, batch, eps, n_valid, rope_end, num_gen=num_gen,
                                       query_chunk=qc)
            return csh(cache), h

        def infer_vae_eps(keys, *, shape):
            return ctx_lib.draw_vae_eps(keys, shape)

        def infer_generate_text(params, fixed, cache, keys, temperature, top_k, top_p, forced, *, start_token,
                                stop_token, max_new_tokens, return_logits):
            model = nnx.merge(gd, params, fixed)
            cache, out = text_lib.generate(model, cache, keys, temperature, top_k, top_p, start_token=start_token,
                                           stop_token=stop_token, max_new_tokens=max_new_tokens,
                                           return_logits=return_logits, forced=forced, constrain=csh)
            return csh(cache), out

        def infer_sample_latents(params, fixed, cache, x1, latent_pos, ts, dts, s_text, s_img, interval,
                                 renorm_min, *, n_ctx, renorm_type, return_trajectory):
            model = nnx.merge(gd, params, fixed)
            return image_lib.sample_latents(model, cache, x1, latent_pos, ts, dts, s_text, s_img, interval,
                                            renorm_min, n_ctx=n_ctx, renorm_type=renorm_type, query_chunk=qc,
                                            return_trajectory=return_trajectory, constrain=rows, marks=marks)

        def infer_velocity(params, fixed, cache, x_t, t, latent_pos, *, n_ctx):
            model = nnx.merge(gd, params, fixed)
            return image_lib.velocity(model, cache, x_t, t, latent_pos, n_ctx=n_ctx, marks=marks, query_chunk=qc)

        def infer_decode_latents(vae_params, latents, *, h, w):
            return image_lib.decode(nnx.merge(vgd, vae_params), self.cfg, latents, h, w)

        def infer_init_noise(keys, *, shape):
            return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), shape, jnp.float32))(keys)

        self._prefill = jax.jit(infer_prefill, static_argnames=("num_gen",), donate_argnums=(3,))
        self._vae_eps = jax.jit(infer_vae_eps, static_argnames=("shape",))
        self._generate = jax.jit(infer_generate_text, donate_argnums=(2,),
                                 static_argnames=("start_token", "stop_token", "max_new_tokens", "return_logits"))
        self._sample = jax.jit(infer_sample_latents, static_argnames=("n_ctx", "renorm_type", "return_trajectory"))
        self._velocity = jax.jit(infer_velocity, static_argnames=("n_ctx",))
        self._decode = jax.jit(infer_decode_latents, static_argnames=("h", "w"))
        self._noise = jax.jit(infer_init_noise, static_argnames=("shape",))

    def row_sharding(self, shape) -> NamedSharding:
        """Rows (axis 0) over the mesh's batch axes when they divide, else replicated."""
        names = ("batch",) + (None,) * (len(shape) - 1)
        return NamedSharding(self.mesh, mesh_lib.logical_to_spec(names, shape, self.mesh))

    def put_rows(self, x):
        """Host array (rows first) -> device with ``row_sharding``."""
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        return jax.device_put(x, self.row_sharding(x.shape))

    # -- public API ----------------------------------------------------------------------------

    @property
    def special(self):
        """The marker ids: the tokenizer's when there is one (training lays samples out with the
        tokenizer's ids), else the model config's."""
        if self.tokenizer is not None:
            return self.tokenizer.special
        return ctx_lib.special_tokens(self.cfg)

    def keys(self, seeds) -> jax.Array:
        """Per-row PRNG keys from integer seeds (a request's randomness depends on its seed only)."""
        return jax.vmap(jax.random.key)(jnp.asarray(np.asarray(seeds, np.uint32)))

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        c = KVCache.create(self.cfg, rows, capacity)
        return jax.device_put(c, cache_shardings(c, self.mesh))

    def pack(self, contexts, *, min_tokens: int = 16) -> ctx_lib.ContextBatch:
        return ctx_lib.pack_contexts(self.cfg, contexts, self.tokenizer, special=self.special,
                                     min_tokens=min_tokens)

    def prefill(self, cache: KVCache, cb: ctx_lib.ContextBatch, keys=None, *, return_hidden: bool = False):
        """Append the packed contexts ``cb`` (one per cache row) to ``cache``. VAE images are
        encoded with their sampling noise from ``cb.vae_eps`` or drawn from ``keys`` (B,)."""
        if cb.rows != cache.rows:
            raise ValueError(f"{cb.rows} contexts for a cache of {cache.rows} rows")
        check_capacity(np.asarray(cache.length), cb.length, cache.capacity)
        eps = None
        if cb.num_gen:
            if not self.has_vae:
                raise ValueError(f"{self.source}: the context has VAE images but the model has no VAE")
            n = cb.batch.vae_images.shape[1]
            if cb.vae_eps is not None:
                eps = self.put_rows(cb.vae_eps)
            else:
                if keys is None:
                    raise ValueError("VAE images need keys (or Image.eps) for their sampling noise")
                eps = self._vae_eps(keys, shape=(cb.rows, n) + cb.latent_shape)
        batch = jax.tree.map(self.put_rows, cb.batch)
        cache, h = self._prefill(self.params, self.fixed, self.vae_params, cache, batch, eps,
                                 self.put_rows(cb.n_valid), self.put_rows(cb.rope_end), num_gen=cb.num_gen)
        return (cache, h) if return_hidden else cache

    def generate_text(self, cache: KVCache, keys, *, max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0,
                      stop_token: int | None = None, return_logits: bool = False, forced_tokens=None):
        """Greedy (temperature 0) or sampled decoding on the prefilled ``cache`` (text.py);
        ``forced_tokens`` (B, max_new_tokens): teacher forcing (scores given answers)."""
        check_capacity(np.asarray(cache.length), max_new_tokens, cache.capacity, "decoding")
        rows = cache.rows
        full = lambda v, dt: self.put_rows(np.broadcast_to(np.asarray(v, dt), (rows,)).copy())
        return self._generate(self.params, self.fixed, cache, keys, full(temperature, np.float32),
                              full(top_k, np.int32), full(top_p, np.float32),
                              None if forced_tokens is None else self.put_rows(np.asarray(forced_tokens, np.int32)),
                              start_token=int(self.special.bos_token_id),
                              stop_token=int(self.special.eos_token_id if stop_token is None else stop_token),
                              max_new_tokens=int(max_new_tokens), return_logits=bool(return_logits))

    def init_noise(self, keys, h: int, w: int) -> jax.Array:
        """x_1 (B, h*w, p*p*C) from the row keys."""
        from sgt_jax.models.config import patch_latent_dim

        return self._noise(keys, shape=(h * w, patch_latent_dim(self.cfg)))

    def sample_latents(self, cache: KVCache, h: int, w: int, flow: image_lib.FlowConfig, *, keys=None,
                       init_noise=None, return_trajectory: bool = False):
        """Euler + CFG (image.py) on a cache of ``flow.num_contexts`` x B rows; x_1 from
        ``init_noise`` (B, h*w, d) or the row keys."""
        n_ctx = flow.num_contexts
        if cache.rows % n_ctx:
            raise ValueError(f"a cache of {cache.rows} rows cannot hold {n_ctx} contexts per request")
        bsz = cache.rows // n_ctx
        x1 = self.put_rows(init_noise) if init_noise is not None else self.init_noise(keys, h, w)
        ts, dts = image_lib.schedule(flow.num_timesteps, flow.timestep_shift)
        full = lambda v: self.put_rows(np.full((bsz,), v, np.float32))
        return self._sample(self.params, self.fixed, cache, x1, jnp.asarray(image_lib.latent_position_ids(self.cfg, h, w)),
                            jnp.asarray(ts), jnp.asarray(dts), full(flow.cfg_text_scale), full(flow.cfg_img_scale),
                            jnp.asarray(flow.cfg_interval, jnp.float32), full(flow.cfg_renorm_min), n_ctx=n_ctx,
                            renorm_type=flow.cfg_renorm_type, return_trajectory=bool(return_trajectory))

    def velocity(self, cache: KVCache, x_t, t: float, h: int, w: int, n_ctx: int = 1) -> jax.Array:
        """The model velocity (n_ctx, B, h*w, d) of x_t (B, h*w, d) at time t on each context."""
        return self._velocity(self.params, self.fixed, cache, self.put_rows(x_t), jnp.float32(t),
                              jnp.asarray(image_lib.latent_position_ids(self.cfg, h, w)), n_ctx=n_ctx)

    def decode_latents(self, latents, h: int, w: int):
        """Latent tokens (B, h*w, d) -> (float (B, 16h, 16w, 3), uint8) images."""
        if not self.has_vae:
            raise ValueError(f"{self.source}: no VAE, cannot decode images")
        return self._decode(self.vae_params, latents, h=h, w=w)


def compile_counts() -> dict[str, int]:
    """Compilations so far of each ``infer_*`` function of this process."""
    return {k: v for k, v in _COMPILES.by_name.items() if "infer_" in k}


_COMPILES = CompileCounter()

