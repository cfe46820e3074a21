"""The PackedBatch contract between the data pipeline and the model (see docs/design.md).

Every array has a shape fixed by the config, never by the data: ``B`` rows of ``L`` tokens,
``P`` ViT patches per row, ``N`` generation images per row of ``h x w`` latent pixels. A row holds
several documents (samples) in packing order, then padding. Per token:

  kind           PAD / TEXT (incl. the four special tokens) / VIT / VAE_CLEAN / VAE_NOISED
  text_ids       token id at TEXT positions (0 elsewhere)
  position_ids   RoPE position (a whole image block shares one)
  doc_ids, split_ids, split_mode   the attention mask's vectors (``Segments`` below; the mask is
                 models/attention.py ``bagel_mask``); padding is its own document
  expert         UND = 0 = und (text, special and ViT tokens; padding), GEN = 1 = gen (VAE latent tokens).
                 Exactly ``num_gen`` positions per row are gen (the packer routes padding to
                 fill the quota) -- ``num_gen`` is static, part of the compiled program.
  ce_mask, ce_labels, ce_weights   next-token CE at this position (weights: BAGEL's optional
                 length reweighting; 1.0 when unused)
  mse_mask       noised latent tokens (flow-matching MSE)
  vit_index      index into this row's ViT patch array of the patch at this position
  vae_token_index  index into this row's patchified latents: image * (h/p * w/p) + r * (w/p) + c
  latent_position_ids  r * max_latent_size + c (latent_pos_embed)
  timesteps      raw flow timestep (one N(0,1) draw per noised image; -inf for clean images)

Per row: ``vit_patches`` (P, 3*14*14), ``vit_position_ids`` (P,), ``vit_image_ids`` (P,) with -1
for padding slots; ``vae_images`` (N, H, W, 3) in [-1, 1] (zero-padded bottom/right as BAGEL
does) -- the train step VAE-encodes them into ``latents`` (N, h, w, C).

This module owns the contract: the enums (token kinds, split modes, experts), the field dtypes
(``DTYPES``) and ``batch_spec`` (shapes + dtypes), used by the packer and by AOT alike.
"""
from __future__ import annotations

import dataclasses

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PAD, TEXT, VIT, VAE_CLEAN, VAE_NOISED = 0, 1, 2, 3, 4    # token kinds (``kind``)
CAUSAL, FULL, NOISE = 0, 1, 2                            # split modes (``split_mode``)
UND, GEN = 0, 1                                          # experts (``expert``)

TOKEN_FIELDS = ("kind", "text_ids", "position_ids", "doc_ids", "split_ids", "split_mode", "expert",
                "ce_mask", "ce_labels", "ce_weights", "mse_mask", "vit_index", "vae_token_index",
                "latent_position_ids", "timesteps")

# field dtypes; the rest are int32. ``vae_images``: float32 or bfloat16 (data.vae_images_dtype).
DTYPES = {"ce_mask": np.dtype(bool), "mse_mask": np.dtype(bool), "ce_weights": np.dtype(np.float32),
          "timesteps": np.dtype(np.float32), "vit_patches": np.dtype(np.float32),
          "latents": np.dtype(np.float32)}


def dtype(field: str, vae_images_dtype: str = "float32") -> np.dtype:
    """The numpy dtype of a PackedBatch field."""
    if field == "vae_images":
        return np.dtype(jnp.bfloat16) if vae_images_dtype == "bfloat16" else np.dtype(np.float32)
    return DTYPES.get(field, np.dtype(np.int32))


class Segments(NamedTuple):
    """The per-token vectors BAGEL's attention mask is computed from, each (B, L) int32: ``doc``
    (doc_ids), ``split`` (split_ids), ``mode`` (split_mode: CAUSAL / FULL / NOISE) and ``order``
    (the token's index in packing order; the row may be physically permuted, e.g. sorted by
    expert -- causality always follows ``order``)."""
    doc: jax.Array
    split: jax.Array
    mode: jax.Array
    order: jax.Array

    def permute(self, perm: jax.Array) -> "Segments":
        """Reorder tokens by ``perm`` (B, L) -- the mask is unchanged up to that permutation."""
        return Segments(*(jnp.take_along_axis(v, perm, axis=1) for v in self))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedBatch:
    # per token, (B, L)
    kind: jax.Array
    text_ids: jax.Array
    position_ids: jax.Array
    doc_ids: jax.Array
    split_ids: jax.Array
    split_mode: jax.Array
    expert: jax.Array
    ce_mask: jax.Array
    ce_labels: jax.Array
    ce_weights: jax.Array
    mse_mask: jax.Array
    vit_index: jax.Array
    vae_token_index: jax.Array
    latent_position_ids: jax.Array
    timesteps: jax.Array
    # per row
    vit_patches: jax.Array          # (B, P, 3*p*p)
    vit_position_ids: jax.Array     # (B, P)
    vit_image_ids: jax.Array        # (B, P), -1 = padding
    vae_images: jax.Array | None = None   # (B, N, H, W, 3) pixels in [-1, 1]
    latents: jax.Array | None = None      # (B, N, h, w, C) scaled VAE latents

    def replace(self, **kw) -> "PackedBatch":
        return dataclasses.replace(self, **kw)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.kind.shape)


def batch_spec(cfg, rows: int | None = None, sharding=None) -> PackedBatch:
    """The PackedBatch of ``jax.ShapeDtypeStruct`` (shapes + dtypes) the data pipeline yields.

    ``cfg``: the data config (``rows_per_batch``, ``tokens_per_row``, ``vit_patches_per_row``,
    ``vae_images_per_row``, ``vae_image_size``, ``vit_patch_size``, ``vae_images_dtype``) or
    anything with those fields (the packer's ``RowSpec``, whose ``vae_hw`` stands for
    ``vae_image_size``); ``rows`` overrides ``rows_per_batch``. ``latents`` is left None (the
    train step fills it)."""
    b = int(cfg.rows_per_batch if rows is None else rows)
    length, p, n = int(cfg.tokens_per_row), int(cfg.vit_patches_per_row), int(cfg.vae_images_per_row)
    hw = getattr(cfg, "vae_hw", None) or cfg.vae_image_size
    h, w = (int(hw), int(hw)) if isinstance(hw, int) else (int(hw[0]), int(hw[1]))
    img = getattr(cfg, "vae_images_dtype", None) or "float32"
    s = lambda f, shape: jax.ShapeDtypeStruct(shape, dtype(f, img), sharding=sharding)  # noqa: E731
    return PackedBatch(**{f: s(f, (b, length)) for f in TOKEN_FIELDS},
                       vit_patches=s("vit_patches", (b, p, 3 * int(cfg.vit_patch_size) ** 2)),
                       vit_position_ids=s("vit_position_ids", (b, p)),
                       vit_image_ids=s("vit_image_ids", (b, p)),
                       vae_images=s("vae_images", (b, n, h, w, 3)))


def check_routing(batch: PackedBatch, num_gen: int) -> None:
    """Eager check of the routing invariants (tests, packer): raises ValueError with the row."""
    kind, expert = np.asarray(batch.kind), np.asarray(batch.expert)
    latent = (kind == VAE_CLEAN) | (kind == VAE_NOISED)
    for r in range(kind.shape[0]):
        if (expert[r][latent[r]] != 1).any():
            raise ValueError(f"row {r}: a VAE latent token is not routed to the gen expert")
        if (expert[r][(kind[r] != PAD) & ~latent[r]] != 0).any():
            raise ValueError(f"row {r}: a text/ViT token is routed to the gen expert")
        n = int((expert[r] == 1).sum())
        if n != num_gen:
            raise ValueError(f"row {r}: {n} gen-routed positions, but the compiled program expects "
                             f"num_gen={num_gen}; route padding to fill the quota")
