"""Held-out evaluation of a model (docs/evaluation.md): held-out CE / MSE at fixed noise, generated
masks scored against their targets (mIoU, PQ), greedy VQA answers (exact match), a sample grid.

``Evaluator(cfg, workdir)`` reads the held-out data once (``cfg.eval``: the held-out synthetic
scenes, generated into ``<workdir>/eval_scenes``, or the sources ``eval.seg`` / ``eval.vqa``);
``evaluator(engine, step)`` scores the engine's current weights and returns ``{"scalars",
"images", "details"}``. ``make_hook`` wraps it for ``train.loop.train(evaluate=...)``.
"""
from __future__ import annotations

import collections
import dataclasses
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sgt_jax import fileio
from sgt_jax.data.records import BadRecord
from sgt_jax.eval import metrics
from sgt_jax.infer import tasks
from sgt_jax.parallel import mesh as mesh_lib
from sgt_jax.train.step import Consts, make_eval_losses

log = logging.getLogger("sgt_jax.eval")
SCENES_DIR = "eval_scenes"


# ------------------------------------------------------------------------------------------------
# held-out data


def _synthetic_opts(cfg) -> dict:
    """The generation options (size, shapes, gen_seed) of the run's synthetic training sources."""
    from sgt_jax.data.sources.registry import parse_spec

    out = {}
    for spec in cfg.data.get("sources", {}).values():
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            kind, _, opts = parse_spec(part)
            if kind.startswith("synthetic"):
                out.setdefault("gen_seeds", set()).add(int(opts.get("gen_seed", 0)))
                for k in ("size", "shapes"):
                    if k in opts:
                        out[k] = opts[k]
    return out


def heldout_specs(cfg, workdir: str) -> tuple[str, str]:
    """(seg spec, vqa spec) of the held-out data: ``eval.seg`` / ``eval.vqa`` when given, else
    synthetic scenes generated with ``eval.scene_seed`` (sizes as the training scenes) into
    ``<workdir>/eval_scenes``."""
    e = cfg.eval
    syn = _synthetic_opts(cfg)
    if e.scene_seed in syn.get("gen_seeds", ()):
        raise ValueError(f"eval.scene_seed={e.scene_seed} is the gen_seed of the run's synthetic training "
                         "scenes: held-out scenes must come from another seed")
    n = max(64, int(e.num_scenes), int(e.num_questions))
    q = f"n={n}&gen_seed={int(e.scene_seed)}" + "".join(f"&{k}={syn[k]}" for k in ("size", "shapes") if k in syn)
    d = fileio.join(workdir, SCENES_DIR)
    return (e.seg or f"synthetic_seg:{d}?{q}"), (e.vqa or f"synthetic_vqa:{d}?{q}")


@dataclasses.dataclass
class HeldOut:
    seg: list            # {"key", "image", "target", "background"}
    vqa: list            # {"key", "image", "question", "answer"}
    skipped: collections.Counter


def _first_turn(record) -> tuple[str, str] | None:
    convs = record.get("conversations") or []
    human = next((c["value"] for c in convs if c.get("from") == "human"), None)
    gpt = next((c["value"] for c in convs if c.get("from") == "gpt"), None)
    if human is None or gpt is None:
        return None
    return human.replace("<image>", "").strip(), gpt


def _good_records(src, prefix: str, skipped: collections.Counter):
    """The records of ``src`` in order; a bad one is counted in ``skipped`` as prefix_reason."""
    for i in range(len(src) if src is not None else 0):
        try:
            yield src[i]
        except BadRecord as e:
            skipped[f"{prefix}_{e.reason}"] += 1


def read_heldout(seg_src, vqa_src, num_scenes: int, num_questions: int) -> HeldOut:
    """The first ``num_scenes`` seg records and ``num_questions`` single-image VQA records; a bad
    record is skipped and counted by reason."""
    skipped: collections.Counter = collections.Counter()
    seg, vqa = [], []
    bg = tuple(getattr(seg_src, "background", (0, 0, 0))) if seg_src is not None else (0, 0, 0)
    for r in _good_records(seg_src if num_scenes > 0 else None, "seg", skipped):
        seg.append({"key": r["id"], "image": np.asarray(r["image"], np.uint8),
                    "target": np.asarray(r["target"], np.uint8), "background": bg})
        if len(seg) >= num_scenes:           # no record read past the last one used
            break
    for r in _good_records(vqa_src if num_questions > 0 else None, "vqa", skipped):
        qa = _first_turn(r)
        if qa is None or len(r.get("images") or []) != 1:
            skipped["vqa_not_single_image_qa"] += 1
            continue
        vqa.append({"key": r["id"], "image": np.asarray(r["images"][0], np.uint8), "question": qa[0],
                    "answer": qa[1]})
        if len(vqa) >= num_questions:
            break
    return HeldOut(seg, vqa, skipped)


def loss_data_config(cfg) -> ml_collections.ConfigDict:
    """The run's data config for the held-out batches: streams seg + vqa only (ratios as the
    run's, default 2:1), exact ratios per batch, read in the main process."""
    d = ml_collections.ConfigDict(cfg.data.to_dict())
    ratios = cfg.data.mix.get("ratios", {})
    d.mix.mode = "samples"
    d.mix.ratios = ml_collections.ConfigDict({"seg": ratios.get("seg", 2) or 2, "vqa": ratios.get("vqa", 1) or 1})
    d.mix.weights = ml_collections.ConfigDict({"seg": 1.0, "vqa": 1.0})
    d.sources = ml_collections.ConfigDict({"seg": "held-out", "vqa": "held-out"})
    d.grain.num_workers = 0
    d.grain.read_threads = 0
    return d


# ------------------------------------------------------------------------------------------------
# the evaluator


class Evaluator:
    def __init__(self, cfg, workdir: str, *, tokenizer, out_dir: str | None = None):
        """``cfg``: a run config with ``model``, ``data``, ``train`` and ``eval`` sections;
        ``workdir``: where held-out synthetic scenes are generated; ``out_dir``: grid PNGs
        (default ``<workdir>/eval``)."""
        from sgt_jax.data.sources.registry import make_source

        self.cfg, self.e = cfg, cfg.eval
        self.out_dir = out_dir or fileio.join(workdir, "eval")
        seg_spec, vqa_spec = heldout_specs(cfg, workdir)
        self.specs = {"seg": seg_spec, "vqa": vqa_spec}
        seed = int(cfg.data.get("seed", 0))
        need_seg = self.e.num_scenes > 0 or self.e.loss_batches > 0
        need_vqa = self.e.num_questions > 0 or self.e.loss_batches > 0
        self.sources = {"seg": make_source(seg_spec.format(workdir=workdir), seed=seed, workdir=workdir) if need_seg else None,
                        "vqa": make_source(vqa_spec.format(workdir=workdir), seed=seed, workdir=workdir) if need_vqa else None}
        self.data = read_heldout(self.sources["seg"], self.sources["vqa"], self.e.num_scenes, self.e.num_questions)
        self.tokenizer = tokenizer
        self.loss_batches = self._loss_batches(workdir) if self.e.loss_batches else []
        self._losses = None
        self._ceiling = None
        self.flow = dataclasses.replace(tasks.SEGMENT_FLOW, num_timesteps=int(self.e.flow_steps),
                                        cfg_text_scale=float(self.e.cfg_text_scale),
                                        cfg_img_scale=float(self.e.cfg_img_scale))

    def _loss_batches(self, workdir):
        from sgt_jax.data.pipeline import make_train_iterator

        it = make_train_iterator(loss_data_config(self.cfg), workdir=workdir, sources=self.sources,
                                 tokenizer=self.tokenizer, process_index=jax.process_index(),
                                 process_count=jax.process_count())
        return [next(it)[0] for _ in range(int(self.e.loss_batches))]

    # -- held-out CE / MSE ----------------------------------------------------------------------

    def losses(self, eng) -> dict:
        """Token-weighted means over the held-out batches of the train step's CE and MSE, with the
        VAE-sampling and flow noise of batch i from ``fold_in(key(eval.seed), i)``."""
        if self._losses is None:
            fn = make_eval_losses(graphdef=eng.graphdef, vae_graphdef=eng.vae_graphdef, cfg=self.cfg,
                                  num_gen=int(self.cfg.data.gen_tokens_per_row),
                                  num_ce=int(self.cfg.data.get("ce_tokens_per_row", 0)))
            self._losses = jax.jit(fn)
        consts = Consts(frozen=nnx.State({}), fixed=eng.fixed, vae=eng.vae_params)
        ce = mse = n_ce = n_mse = 0.0
        for i, b in enumerate(self.loss_batches):
            key = jax.random.fold_in(jax.random.key(int(self.e.seed)), i)
            out = jax.device_get(self._losses(eng.params, consts, mesh_lib.global_batch(b, eng.mesh), key))
            ce += float(out["ce"]) * float(out["tokens_ce"])
            mse += float(out["mse"]) * float(out["tokens_mse"])
            n_ce += float(out["tokens_ce"])
            n_mse += float(out["tokens_mse"])
        t = self.cfg.train
        ce, mse = ce / max(n_ce, 1), mse / max(n_mse, 1)
        return {"ce": ce, "mse": mse, "loss": t.ce_weight * ce + t.mse_weight * mse}

    def vae_ceiling(self, eng) -> float:
        """mIoU of the targets passed through the VAE alone (encode at the posterior mean,
        decode, uint8): what a model generating exactly the target's latents would score. The VAE
        is frozen, so it is computed once. A random VAE (the tiny preset) gives ~0: generated-mask
        scores then say nothing about the model."""
        if self._ceiling is None:
            from sgt_jax.data.samples import resize

            def roundtrip(vae_params, x):
                v = nnx.merge(eng.vae_graphdef, vae_params)
                f = v.downsample_factor
                eps = jnp.zeros((x.shape[0], x.shape[1] // f, x.shape[2] // f, v.config.z_channels))
                return v.decode(v.encode(x, eps=eps))

            fn = jax.jit(roundtrip)
            scores = []
            for s in self.data.seg:
                t = s["target"]
                w, h = eng.transforms.vae.size(t.shape[1], t.shape[0])
                x = resize(t, w, h, "nearest").astype(np.float32) / 127.5 - 1.0
                y = np.asarray(fn(eng.vae_params, jnp.asarray(x)[None]), np.float32)[0]
                u8 = resize(np.clip((y + 1.0) * 127.5, 0, 255).astype(np.uint8), t.shape[1], t.shape[0], "nearest")
                scores.append(metrics.score_mask(t, u8, s["background"]))
            self._ceiling = metrics.summarize(scores)["miou"]
        return self._ceiling

    # -- generation -----------------------------------------------------------------------------

    def __call__(self, eng, step: int | None = None) -> dict:
        e, d = self.e, self.data
        scalars, details = {}, {}
        if self.loss_batches:
            scalars.update(self.losses(eng))
        seeds = lambda n: [int(e.seed) * 100003 + i for i in range(n)]
        masks, answers = [], []
        if d.seg:
            masks = tasks.segment(eng, [s["image"] for s in d.seg], flow=self.flow, seeds=seeds(len(d.seg)),
                                  batch_size=int(e.batch_size), resize_to_input=True)
            scores = [metrics.score_mask(s["target"], m, s["background"]) for s, m in zip(d.seg, masks)]
            summ = metrics.summarize(scores)
            scalars.update({f"seg_{k}": v for k, v in summ.items()})
            scalars["seg_miou_vae_ceiling"] = self.vae_ceiling(eng)
            details["seg"] = [{"key": s["key"], "miou": sc.miou, "ious": sc.ious, "tp": sc.tp, "fp": sc.fp,
                               "fn": sc.fn} for s, sc in zip(d.seg, scores)]
        if d.vqa:
            outs = tasks.answer(eng, [([q["image"]], q["question"]) for q in d.vqa], seeds=seeds(len(d.vqa)),
                                max_new_tokens=int(e.max_new_tokens), batch_size=int(e.batch_size))
            answers = [o["text"] or "" for o in outs]
            right = [metrics.exact_match(a, q["answer"]) for a, q in zip(answers, d.vqa)]
            scalars.update(vqa_acc=float(np.mean(right)), vqa_questions=len(right))
            details["vqa"] = [{"key": q["key"], "question": q["question"], "answer": q["answer"],
                               "prediction": a, "correct": c} for q, a, c in zip(d.vqa, answers, right)]
        if d.skipped:
            scalars.update({f"skipped_{k}": v for k, v in d.skipped.items()})
        images = {}
        if e.grid_rows and d.seg:
            grid = sample_grid(d, masks, answers, int(e.grid_rows))
            images["grid"] = grid
            from PIL import Image

            name = "grid.png" if step is None else f"grid_{step:06d}.png"
            path = fileio.join(self.out_dir, name)
            fileio.makedirs(self.out_dir)
            with fileio.open_write(path) as f:
                Image.fromarray(grid).save(f, format="PNG")
            details["grid"] = path
        return {"scalars": scalars, "images": images, "details": details, "masks": masks}


def summary_line(step, s: dict) -> str:
    parts = [f"eval step {step}:"]
    if "ce" in s:
        parts.append(f"held-out CE {s['ce']:.4f} MSE {s['mse']:.4f}")
    if "seg_miou" in s:
        parts.append(f"| seg mIoU {s['seg_miou']:.3f} PQ {s['seg_pq']:.3f} ({s['seg_images']} images; "
                     f"VAE ceiling mIoU {s['seg_miou_vae_ceiling']:.3f})")
    if "vqa_acc" in s:
        parts.append(f"| VQA acc {s['vqa_acc']:.3f} ({s['vqa_questions']} questions)")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------
# the grid


def _panel(im: np.ndarray, side: int) -> np.ndarray:
    from sgt_jax.data.samples import resize

    return resize(np.asarray(im, np.uint8), side, side, "nearest")


def _text_panel(lines, side: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (side * 2, side), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y, width = 2, max(8, (side * 2) // 6)
    for text, color in lines:
        words, line = str(text).split(), ""
        for w in words + [None]:
            if w is not None and len(line) + len(w) + 1 <= width:
                line = f"{line} {w}".strip()
                continue
            draw.text((3, y), line, fill=color)
            y += 11
            line = w or ""
            if y > side - 11:
                break
    return np.asarray(canvas)


def sample_grid(data: HeldOut, masks, answers, rows: int, side: int = 128) -> np.ndarray:
    """Rows of [input | target | generated mask | a question about the same image (if any, else
    the row's question), the generated answer, the reference]."""
    out = []
    for i, s in enumerate(data.seg[:rows]):
        j = next((k for k, q in enumerate(data.vqa) if str(q["key"]).startswith(f"{s['key']}_")),
                 i if i < len(data.vqa) else None)
        lines = []
        if j is not None and j < len(answers):
            q = data.vqa[j]
            ok = metrics.exact_match(answers[j], q["answer"])
            lines = [(f"Q: {q['question'].splitlines()[0]}", (0, 0, 0)),
                     (f"A: {answers[j]}", (0, 130, 0) if ok else (200, 0, 0)), (f"ref: {q['answer']}", (90, 90, 90))]
        out.append(np.concatenate([_panel(s["image"], side), _panel(s["target"], side), _panel(masks[i], side),
                                   _text_panel(lines, side)], axis=1))
    return np.concatenate(out, axis=0)


# ------------------------------------------------------------------------------------------------
# inside training


def make_hook(cfg, workdir: str):
    """``evaluate(step, state, consts)`` for ``train.loop.train``: at step 0, every ``eval.every``
    steps and at ``train.steps``, the EMA (``eval.weights``) scored by an ``Evaluator`` built on
    first use; None when ``eval.every`` is 0. It only reads the state."""
    e = cfg.get("eval")
    if e is None or not e.every:
        return None
    heldout_specs(cfg, workdir)          # a seed clash is an error before training starts
    box = {}

    def hook(step, state, consts):
        if not (step == 0 or step % e.every == 0 or step == cfg.train.steps):
            return None
        from sgt_jax.data.pipeline import ensure_tokenizer
        from sgt_jax.infer.engine import Engine

        trained = state.ema if e.weights == "ema" else state.params
        params = nnx.to_pure_dict(nnx.merge_state(trained, consts.frozen))
        vae = nnx.to_pure_dict(consts.vae)
        if "eng" not in box:
            tok = ensure_tokenizer(cfg.data, workdir)
            mesh = jax.tree.leaves(state.params)[0].sharding.mesh
            box["eng"] = Engine(cfg.model, params, vae, tokenizer=tok, data_cfg=cfg.data, mesh=mesh,
                                source=f"run {workdir}")
            box["ev"] = Evaluator(cfg, workdir, tokenizer=tok)
        else:
            box["eng"].set_weights(params, vae)
        eng = box["eng"]
        try:
            out = box["ev"](eng, step)
        finally:
            eng.params = eng.vae_params = None       # no reference to the state the next step donates
        log.info("%s", summary_line(step, out["scalars"]))
        return {"scalars": out["scalars"], "images": out["images"]}

    return hook
