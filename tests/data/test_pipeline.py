"""Grain pipeline: exact mixing per batch, determinism, exact resume (in-process, Orbax, worker
processes), multi-host shards, bad records skipped and counted, the default synthetic data."""
import json

import numpy as np
import pytest

from sgt_jax import batch as B
from sgt_jax.data import config as C
from sgt_jax.data import pipeline as PL
from sgt_jax.data.records import BadRecord
from sgt_jax.data.tokenizer import Tokenizer, build_tiny_tokenizer

FIELDS = B.TOKEN_FIELDS + ("vit_patches", "vit_position_ids", "vit_image_ids", "vae_images")


def _img(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def seg_records(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(40, 130)), int(rng.integers(40, 130))
        out.append({"task": "seg", "id": f"s{seed}_{i}", "image": _img(h, w, 2 * i),
                    "target": _img(h, w, 2 * i + 1)})
    return out


def vqa_records(n, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = " ".join(["How many shapes are there"] * int(rng.integers(1, 4))) + "?"
        imgs = [_img(int(rng.integers(40, 120)), int(rng.integers(40, 120)), 1000 + i)] if i % 5 else []
        out.append({"task": "vqa", "id": f"v{seed}_{i}", "images": imgs,
                    "conversations": [{"from": "human", "value": ("<image>\n" if imgs else "") + q},
                                      {"from": "gpt", "value": f"There are {i % 7} shapes."}]})
    return out


SEG, VQA = seg_records(40), vqa_records(30)


class FlakySource:
    """A source whose records fail in the ways real files do (BadRecord, broken arrays, crashes)."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        if isinstance(r, Exception):
            raise r
        return r


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok") / "t")))


def _cfg(**kw):
    cfg = C.tiny_data_config()
    for k, v in kw.items():
        tgt = cfg
        for p in k.split(".")[:-1]:
            tgt = tgt[p]
        tgt[k.split(".")[-1]] = v
    return cfg


def _it(cfg, tok, sources=None, **kw):
    return PL.make_train_iterator(cfg, workdir=None, sources=sources or {"seg": SEG, "vqa": VQA},
                                  tokenizer=tok, **kw)


def _same(a, b):
    for f in FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)), err_msg=f)


def test_batches_are_static_valid_and_exactly_two_to_one(tok):
    cfg = _cfg()
    it = _it(cfg, tok)
    L, P, N = cfg.tokens_per_row, cfg.vit_patches_per_row, cfg.vae_images_per_row
    for _ in range(6):
        batch, st = next(it)
        assert batch.kind.shape == (cfg.rows_per_batch, L)
        assert batch.vit_patches.shape == (cfg.rows_per_batch, P, 3 * 14 * 14)
        assert batch.vae_images.shape == (cfg.rows_per_batch, N, 128, 128, 3)
        B.check_routing(batch, cfg.gen_tokens_per_row)
        assert st["batch/samples/seg"] == 2 * st["batch/samples/vqa"] > 0
        assert st["batch/tokens/pad"] == (batch.kind == B.PAD).sum()
        assert st["batch/fill"] > 0.6
    assert st["total/samples/seg"] == 2 * st["total/samples/vqa"]
    assert st["total/batches"] == 6 and st["total/deferred"] > 0
    kinds = ("text", "vit", "vae_noised", "pad")
    assert all(st[f"total/tokens/{k}"] > 0 for k in kinds)
    assert sum(st[f"total/tokens/{k}"] for k in kinds) + st["total/tokens/vae_clean"] == 6 * 4 * L


def test_other_ratios_tokens_and_weights_modes(tok):
    st = next(_it(_cfg(**{"mix.ratios": {"seg": 1, "vqa": 3}}), tok))[1]
    assert 3 * st["batch/samples/seg"] == st["batch/samples/vqa"]
    it_a, it_b = _it(_cfg(**{"mix.mode": "weights"}), tok), _it(_cfg(**{"mix.mode": "weights"}), tok)
    for _ in range(4):
        (a, sa), (b, sb) = next(it_a), next(it_b)
        _same(a, b)
    frac = sa["total/samples/seg"] / sa["total/samples"]
    assert 0.05 < frac < 0.45          # official weights 1 : 5 -> ~1/6 of the samples are seg


def test_tokens_mode_matches_token_shares(tok):
    it = _it(_cfg(**{"mix.mode": "tokens"}), tok)
    seen = {"seg": 0, "vqa": 0}
    orig = it._parent._next_group

    def spy():
        g = orig()
        for s in g:
            seen[s.stream] += s.num_tokens
        return g
    it._parent._next_group = spy
    for _ in range(6):
        next(it)
    share = seen["seg"] / (seen["seg"] + seen["vqa"])
    assert abs(share - 2 / 3) < 0.05, seen


def test_deterministic_for_a_seed(tok):
    a, b, c = _it(_cfg(), tok), _it(_cfg(), tok), _it(_cfg(seed=1), tok)
    for _ in range(3):
        ba, bb, bc = next(a)[0], next(b)[0], next(c)[0]
        _same(ba, bb)
    assert not np.array_equal(ba.timesteps, bc.timesteps)


def test_exact_resume_in_process_json(tok):
    cfg = _cfg(**{"grain.read_threads": 2})
    it = _it(cfg, tok)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["parent"]["buffer"], "the test should restore a non-empty packer buffer"
    want = [next(it) for _ in range(5)]
    fresh = _it(cfg, tok)
    fresh.set_state(state)
    for (a, sa), (b, sb) in zip(want, (next(fresh) for _ in range(5))):
        _same(a, b)
        assert sa == sb
    with pytest.raises(ValueError, match="shard"):
        _it(cfg, tok, process_count=2).set_state(state)


def test_orbax_checkpoint_roundtrip(tok, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    cfg = _cfg()
    it = _it(cfg, tok)
    next(it)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"), options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False))
    mngr.save(1, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = [next(it)[0] for _ in range(3)]
    fresh = _it(cfg, tok)
    mngr.restore(1, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    for a in want:
        _same(a, next(fresh)[0])
    mngr.close()


def test_multi_host_shards_are_disjoint_slices(tok):
    cfg = _cfg(rows_per_batch=4)
    seen = []
    for p in range(2):
        it = _it(cfg, tok, process_index=p, process_count=2)
        for _ in range(3):
            batch, st = next(it)
            assert batch.kind.shape[0] == 2                    # B / process_count rows
            assert st["batch/samples/seg"] == 2 * st["batch/samples/vqa"]
        cur = it._parent.cursor
        k, K = it._parent.shard
        assert K == 2 and k == p
        seen.append({(s, m * K + k) for s in cur for m in range(cur[s])})
    assert not seen[0] & seen[1]


def test_bad_records_are_skipped_and_counted(tok):
    huge = {"task": "vqa", "id": "long", "images": [],
            "conversations": [{"from": "human", "value": "word " * 600}, {"from": "gpt", "value": "ok"}]}
    seg = SEG[:10] + [BadRecord("corrupt_image", "src", "k1"), BadRecord("bad_annotation", "src", "k2"),
                      {"task": "seg", "id": "gray", "image": np.zeros((30, 30), np.uint8), "target": _img(30, 30, 0)},
                      RuntimeError("reader bug"), "not a dict"]
    vqa = VQA[:10] + [huge, {"task": "vqa", "id": "ph", "images": [],
                             "conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}]}]
    it = _it(_cfg(), tok, sources={"seg": FlakySource(seg), "vqa": FlakySource(vqa)})
    for _ in range(8):
        batch, st = next(it)
        B.check_routing(batch, 128)
    for k in ("skipped/corrupt_image", "skipped/bad_annotation", "skipped/bad_array", "skipped/error_RuntimeError",
              "skipped/bad_record", "skipped/placeholder_mismatch", "dropped/over_max_tokens_per_sample"):
        assert st[f"total/{k}"] >= 1, k
    # every good record is delivered (one epoch of each stream consumed by now)
    assert st["total/samples/seg"] >= 10 and st["total/samples/vqa"] >= 10
    with pytest.raises(RuntimeError, match="in a row"):
        next(_it(_cfg(**{"packer.max_consecutive_errors": 5}), tok,
                 sources={"seg": FlakySource([BadRecord("x")] * 3), "vqa": VQA}))


def test_default_config_generates_synthetic_data_and_tokenizer(tmp_path):
    cfg = C.tiny_data_config()
    cfg.sources.seg = "synthetic_seg:{workdir}/synthetic?n=12"
    cfg.sources.vqa = "synthetic_vqa:{workdir}/synthetic?n=12"
    it = PL.make_train_iterator(cfg, workdir=str(tmp_path))
    batch, st = next(it)
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
    assert (tmp_path / "synthetic" / "vqa.jsonl").exists()
    B.check_routing(batch, cfg.gen_tokens_per_row)
    assert st["batch/samples/seg"] == 2 * st["batch/samples/vqa"] > 0


def test_config_validation():
    cfg = C.tiny_data_config()
    C.validate(cfg)
    C.validate(C.default_data_config())
    bad = C.tiny_data_config()
    bad.vit_patches_per_row = 1000
    with pytest.raises(ValueError, match="vit_patches_per_row"):
        C.validate(bad)
    bad = C.tiny_data_config()
    bad.mix.ratios = {"seg": 2}
    with pytest.raises(ValueError, match="mix.ratios"):
        C.validate(bad)
    with pytest.raises(ValueError, match="process_count"):
        C.validate(C.tiny_data_config(), process_count=3)
    assert PL.integer_ratios({"a": 0.5, "b": 0.25}) == {"a": 2, "b": 1}
    assert PL.integer_ratios({"seg": 2, "vqa": 1}) == {"seg": 2, "vqa": 1}


def test_exact_resume_with_worker_processes(tok):
    """Restoring mid-stream gives the same next 50 batches as the uninterrupted iterator, with
    Grain worker processes on (a fresh iterator with fresh workers)."""
    cfg = _cfg(**{"grain.num_workers": 2, "rows_per_batch": 2, "packer.max_buffer": 4})
    it = _it(cfg, tok)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(50)]
    it.close()
    fresh = _it(cfg, tok)
    fresh.set_state(state)
    for a, sa in want:
        b, sb = next(fresh)
        _same(a, b)
        assert sa == sb
    fresh.close()
