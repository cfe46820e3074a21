"""GRPO loss and gradients vs an independent PyTorch implementation written from the published
formulas (DeepSeekMath eq. 3 / 4 with Schulman's k3 KL estimator; TRL's GRPOTrainer is not a
light test dependency: it pulls accelerate and datasets)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sgt_jax.rl import grpo  # noqa: E402


def torch_grpo(logits, tokens, old_logp, ref_logp, rewards, mask, G, eps_lo, eps_hi, beta, reduction):
    """Independent reference. logits (N, T, V) requires grad."""
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    r = rewards.view(-1, G)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1, 1)
    ratio = torch.exp(logp - old_logp)
    surr = torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_lo, 1 + eps_hi) * adv)
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    per_tok = -(surr - beta * kl)
    m = mask.float()
    if reduction == "sequence":
        loss = ((per_tok * m).sum(1) / m.sum(1)).mean()
    else:
        loss = (per_tok * m).sum() / m.sum()
    loss.backward()
    return loss.item(), logits.grad.numpy()


@pytest.mark.parametrize("reduction,beta,eps_hi", [("sequence", 0.04, 0.2), ("token", 0.1, 0.28),
                                                   ("sequence", 0.0, 0.2)])
def test_grpo_loss_and_grads_match_torch(reduction, beta, eps_hi):
    rng = np.random.default_rng(0)
    N, T, V, G = 8, 7, 11, 4
    logits = rng.normal(size=(N, T, V)).astype(np.float32)
    tokens = rng.integers(0, V, (N, T))
    logp0 = np.take_along_axis(logits - np.log(np.exp(logits).sum(-1, keepdims=True)), tokens[..., None], -1)[..., 0]
    old = (logp0 + rng.normal(scale=0.3, size=(N, T))).astype(np.float32)     # ratios away from 1: clipping active
    ref = (logp0 + rng.normal(scale=0.5, size=(N, T))).astype(np.float32)
    rewards = rng.uniform(size=N).astype(np.float32)
    lengths = rng.integers(1, T + 1, N)
    mask = np.arange(T)[None] < lengths[:, None]

    c = grpo.GRPOConfig(group_size=G, clip_eps_low=0.2, clip_eps_high=eps_hi, kl_beta=beta, reduction=reduction)

    def f(lg):
        lp = jnp.take_along_axis(jax.nn.log_softmax(lg, -1), jnp.asarray(tokens)[..., None], -1)[..., 0]
        adv = grpo.group_advantages(jnp.asarray(rewards), G)
        return grpo.grpo_loss(lp, jnp.asarray(old), jnp.asarray(ref), adv, jnp.asarray(mask), c)

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logits))
    t_logits = torch.tensor(logits, requires_grad=True)
    ref_loss, ref_grad = torch_grpo(t_logits, torch.tensor(tokens), torch.tensor(old), torch.tensor(ref),
                                    torch.tensor(rewards), torch.tensor(mask), G, 0.2, eps_hi, beta, reduction)
    assert abs(float(loss) - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    np.testing.assert_allclose(np.asarray(grad), ref_grad, atol=1e-6, rtol=1e-4)
    assert 0.0 < float(metrics["clip_fraction"]) < 1.0      # the clip is exercised
    assert np.abs(np.asarray(grad)).sum() > 0


def test_advantages_are_group_normalised():
    r = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    a = np.asarray(grpo.group_advantages(r, 4))
    assert np.allclose(a[4:], 0.0)                            # a group with equal rewards: no signal
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert np.allclose(a[:4], ((ref - ref.mean()) / (ref.std() + 1e-4)).numpy(), atol=1e-6)
