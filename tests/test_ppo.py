"""PPO update parity with an independent numpy implementation, and batch/accumulation invariance.

The numpy side recomputes everything from the models' final hidden states: log-probs through the
LM head, k1 KL, shaped rewards, GAE, whitening, the clipped actor and critic losses, their
gradients with respect to the LM head and the score head, and the AdamW step on those weights.
"""


import numpy as np
import paddle
import pytest

from ppo.args import PPOArgs
from ppo.core.experience import Experience
from ppo.models import load_score_model, position_ids_from_mask
from ppo.rollout.collect import action_mask_of, forward_log_probs


@pytest.fixture(scope="module")
def ppo_dirs(tiny_dir, tiny_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo")
    reward = load_score_model(str(tiny_dir / "base"))
    reward.save_pretrained(str(out / "rm"))
    tiny_tokenizer.save_pretrained(str(out / "rm"))
    return {"actor": str(tiny_dir / "base"), "rm": str(out / "rm"), "out": out}


def make_trainer(ppo_dirs, name, **overrides):
    from ppo.stages.ppo.trainer import PPOTrainer

    kwargs = dict(actor_model_name_or_path=ppo_dirs["actor"], reward_model_name_or_path=ppo_dirs["rm"],
                  train_datasets="tiny-prompts/train", output_dir=str(ppo_dirs["out"] / name), max_length=64,
                  max_new_tokens=8, per_device_prompt_batch_size=4, per_device_train_batch_size=4,
                  gradient_accumulation_steps=1, update_iters=1, learning_rate=1e-3, critic_learning_rate=2e-3,
                  weight_decay=0.01, critic_weight_decay=0.0, lr_scheduler_type="constant",
                  critic_lr_scheduler_type="constant", max_grad_norm=0.0, kl_coeff=0.1, clip_range_ratio=0.2,
                  clip_range_value=0.05, clip_range_score=1.5, gamma=0.99, lam=0.9, normalize_advantage=True,
                  max_steps=1, disable_tqdm=True, seed=7, shuffle_minibatches=False)
    kwargs.update(overrides)
    return PPOTrainer(PPOArgs(**kwargs))


def fixed_experience(trainer, perturb_seed=3) -> Experience:
    """Fixed prompts and responses (one without EOS), scored by the trainer's models."""
    tok = trainer.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompts = [tok(f"BEGINNING OF CONVERSATION: USER: Tell me about the {t}. ASSISTANT:")["input_ids"]
               for t in ("cat", "river", "garden bakery", "dog")]
    responses = [tok(" The cat is kind and warm.", add_special_tokens=False)["input_ids"] + [eos],
                 tok(" The river is rude, sad and calm.", add_special_tokens=False)["input_ids"] + [eos],
                 tok(" The garden is", add_special_tokens=False)["input_ids"],  # cut off: no EOS
                 tok(" The dog is happy.", add_special_tokens=False)["input_ids"] + [eos]]
    P, R = max(map(len, prompts)), max(map(len, responses))
    seqs = [[pad] * (P - len(p)) + p + r + [pad] * (R - len(r)) for p, r in zip(prompts, responses)]
    mask = [[0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (R - len(r)) for p, r in zip(prompts, responses)]
    seqs, mask = paddle.to_tensor(seqs, dtype="int64"), paddle.to_tensor(mask, dtype="int64")
    # the actor differs from the reference so that the KL term is not zero
    rng = np.random.default_rng(perturb_seed)
    for p in trainer.actor.parameters():
        p.set_value(p.numpy() + rng.normal(0, 0.02, p.shape).astype("float32"))
    with paddle.no_grad():
        old, _ = forward_log_probs(trainer.actor, seqs, mask)
        ref, _ = forward_log_probs(trainer.models.reference, seqs, mask)
        values = trainer.critic(seqs, mask).scores.squeeze(-1)[:, :-1]
    # rollout-time values away from the current critic, so that the value clip matters
    values = values + paddle.to_tensor(rng.normal(0, 0.08, values.shape).astype("float32"))
    lengths = paddle.to_tensor([len(r) for r in responses], dtype="int64")
    return Experience(sequences=seqs, attention_mask=mask, action_mask=action_mask_of(mask, P),
                      old_log_probs=old, ref_log_probs=ref, values=values,
                      end_scores=paddle.to_tensor([0.7, -2.3, 0.4, 1.1], dtype="float32"),
                      response_lengths=lengths, ended_with_eos=paddle.to_tensor([True, True, False, True]),
                      prompt_length=P)


# ---------------------------------------------------------------------------------------------
# numpy reference


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_whiten(x, m):
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / (n - 1)
    return (x - mean) / np.sqrt(var + 1e-8)


def np_adamw(w, g, lr, wd, b1=0.9, b2=0.95, eps=1e-8):
    m, v = (1 - b1) * g, (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1), v / (1 - b2)
    return w * (1 - lr * wd) - lr * m_hat / (np.sqrt(v_hat) + eps)


def reference_update(exp, h_actor, w_head, h_critic, w_score, b_score, args):
    seq, mask = exp.sequences.numpy(), exp.action_mask.numpy().astype(np.float64)
    B, T = mask.shape
    # log-probs of tokens 1..L-1 through the LM head
    logits = h_actor[:, :-1] @ w_head                    # [B, T, V]
    logp_all = np_log_softmax(logits)
    labels = seq[:, 1:]
    logp = np.take_along_axis(logp_all, labels[..., None], -1)[..., 0]
    old, ref = exp.old_log_probs.numpy().astype(np.float64), exp.ref_log_probs.numpy().astype(np.float64)
    # KL-shaped rewards: -beta * k1 on every action token, clipped score at the last one
    rewards = np.zeros((B, T))
    scores = exp.end_scores.numpy().astype(np.float64)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                rewards[b, t] -= args.kl_coeff * (old[b, t] - ref[b, t])
        last = max(t for t in range(T) if mask[b, t])
        rewards[b, last] += np.clip(scores[b], -args.clip_range_score, args.clip_range_score)
    # GAE, a backward loop per row over the masked values
    values = exp.values.numpy().astype(np.float64) * mask
    adv = np.zeros((B, T))
    for b in range(B):
        running = 0.0
        for t in reversed(range(T)):
            next_v = values[b, t + 1] if t + 1 < T else 0.0
            delta = rewards[b, t] * mask[b, t] + args.gamma * next_v - values[b, t]
            running = delta + args.gamma * args.lam * running
            adv[b, t] = running
    returns = (adv + values) * mask
    adv = np_whiten(adv * mask, mask) * mask
    n = mask.sum()
    # actor: clipped surrogate, gradient w.r.t. the LM head
    ratio = np.exp(logp - old)
    pg1, pg2 = -adv * ratio, -adv * np.clip(ratio, 1 - args.clip_range_ratio, 1 + args.clip_range_ratio)
    actor_loss = (np.maximum(pg1, pg2) * mask).sum() / n
    d_logp = np.where(pg1 >= pg2, -adv * ratio, 0.0) * mask / n
    onehot = np.zeros_like(logits)
    np.put_along_axis(onehot, labels[..., None], 1.0, -1)
    d_logits = d_logp[..., None] * (onehot - np.exp(logp_all))
    g_head = np.einsum("bth,btv->hv", h_actor[:, :-1], d_logits)
    # critic: clipped value loss, gradient w.r.t. the score head
    v_new = (h_critic[:, :-1] @ w_score + b_score)[..., 0]
    v_old = exp.values.numpy().astype(np.float64)
    c = args.clip_range_value
    v_clip = v_old + np.clip(v_new - v_old, -c, c)
    l1, l2 = (v_new - returns) ** 2, (v_clip - returns) ** 2
    critic_loss = 0.5 * (np.maximum(l1, l2) * mask).sum() / n
    inside = np.abs(v_new - v_old) < c
    d_v = np.where(l1 >= l2, (v_new - returns), np.where(inside, v_clip - returns, 0.0)) * mask / n
    g_score = np.einsum("bth,bt->h", h_critic[:, :-1], d_v)[:, None]
    return {"logp": logp, "rewards": rewards, "advantages": adv, "returns": returns,
            "actor_loss": actor_loss, "critic_loss": critic_loss, "g_head": g_head, "g_score": g_score,
            "w_head": np_adamw(w_head, g_head, args.learning_rate, args.weight_decay),
            "w_score": np_adamw(w_score, g_score, args.critic_learning_rate, args.critic_weight_decay)}


def hidden(backbone, exp):
    with paddle.no_grad():
        out = backbone(input_ids=exp.sequences, attention_mask=exp.attention_mask,
                       position_ids=position_ids_from_mask(exp.attention_mask), return_dict=True)
    return out.last_hidden_state.numpy().astype(np.float64)


def test_one_ppo_update_matches_numpy(ppo_dirs):
    trainer = make_trainer(ppo_dirs, "parity")
    exp = fixed_experience(trainer)
    args = trainer.args
    ref = reference_update(exp, hidden(trainer.actor.llama, exp), trainer.actor.lm_head.weight.numpy().astype(np.float64),
                           hidden(trainer.critic.llama, exp), trainer.critic.score_head.weight.numpy().astype(np.float64),
                           trainer.critic.score_head.bias.numpy().astype(np.float64), args)
    mask = exp.action_mask.numpy()
    np.testing.assert_allclose(exp.old_log_probs.numpy() * mask, ref["logp"] * mask, rtol=1e-5, atol=1e-5)

    exp = trainer.advantages(exp)
    np.testing.assert_allclose(exp.rewards.numpy(), ref["rewards"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exp.returns.numpy(), ref["returns"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exp.advantages.numpy(), ref["advantages"], rtol=1e-5, atol=1e-5)

    grads = {}
    original_step = trainer._step

    def recording_step(optimizer, scheduler, model, *args, **kwargs):
        head = model.lm_head.weight if hasattr(model, "lm_head") else model.score_head.weight
        grads[model.__class__.__name__] = head.grad.numpy().astype(np.float64)
        return original_step(optimizer, scheduler, model, *args, **kwargs)

    trainer._step = recording_step
    stats = trainer.update(exp, step=1)
    assert abs(stats["actor_loss"] - ref["actor_loss"]) <= 1e-5 * max(1.0, abs(ref["actor_loss"])) + 1e-7
    assert abs(stats["critic_loss"] - ref["critic_loss"]) <= 1e-5 * abs(ref["critic_loss"])
    assert stats["clip_frac"] == 0.0  # first epoch: ratio == 1
    assert 0.0 < stats["value_clip_frac"] < 1.0  # the tight value clip is active on some tokens
    g_head, g_score = grads["LlamaForCausalLM"], grads["LlamaModelForScore"]
    assert np.abs(g_head).max() > 1e-4
    np.testing.assert_allclose(g_head, ref["g_head"], rtol=1e-5, atol=1e-5 * np.abs(ref["g_head"]).max())
    np.testing.assert_allclose(g_score, ref["g_score"], rtol=1e-5, atol=1e-5 * np.abs(ref["g_score"]).max())
    # AdamW step on the heads; entries with |g| near eps are sign-sensitive, so compare where g is clear
    clear = np.abs(ref["g_head"]) > 1e-6
    np.testing.assert_allclose(trainer.actor.lm_head.weight.numpy()[clear], ref["w_head"][clear], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trainer.critic.score_head.weight.numpy(), ref["w_score"], rtol=1e-5, atol=1e-6)


def record_grads(trainer):
    """Wrap the optimizer step to keep a copy of every gradient it is about to apply."""
    grads = {}
    original = trainer._step

    def step(optimizer, scheduler, model, *args, **kwargs):
        for name, p in model.named_parameters():
            if p.grad is not None:
                grads[(model.__class__.__name__, name)] = p.grad.numpy().copy()
        return original(optimizer, scheduler, model, *args, **kwargs)

    trainer._step = step
    return grads


MODEL_CLASS = {"actor": "LlamaForCausalLM", "critic": "LlamaModelForScore"}


def model_weights(trainer):
    weights = {("actor", k): v.numpy().astype(np.float64) for k, v in trainer.actor.state_dict().items()}
    weights.update({("critic", k): v.numpy().astype(np.float64) for k, v in trainer.critic.state_dict().items()})
    return weights


def assert_one_adamw_step(before, grads, after, args):
    """Every weight moved by exactly one AdamW step (numpy, float64) on the gradients the step was
    given, clipped to the global norm ``max_grad_norm`` per model; no decay on biases and norms."""
    settings = {"actor": (args.learning_rate, args.weight_decay), "critic": (args.critic_learning_rate,
                                                                           args.critic_weight_decay)}
    for role, (lr, wd) in settings.items():
        mine = {name: g.astype(np.float64) for (cls, name), g in grads.items() if cls == MODEL_CLASS[role]}
        assert mine, role
        norm = np.sqrt(sum((g * g).sum() for g in mine.values()))
        clip = args.max_grad_norm / max(norm, args.max_grad_norm) if args.max_grad_norm > 0 else 1.0
        for (r, name), w in before.items():
            if r != role:
                continue
            g = mine.get(name)
            decay = 0.0 if "bias" in name or "norm" in name else wd
            want = w if g is None else np_adamw(w, g * clip, lr, decay)
            # 1e-6 is 0.1% of one step (lr 1e-3), above float32 rounding of the weights
            np.testing.assert_allclose(after[(role, name)], want, rtol=0, atol=1e-6, err_msg=f"{role} {name}")


@pytest.mark.parametrize("extra", [{}, {"ptx_datasets": "tiny-sft", "ptx_coeff": 0.5}], ids=["ppo", "ppo+ptx"])
def test_batch_4x1_equals_batch_1x4(ppo_dirs, extra):
    """One token-mean per optimizer step: the same update from 1 micro-batch of 4 as from 4 of 1
    (the rows' response lengths differ, and with ptx so do the ptx rows' answer lengths)."""
    results = []
    for name, mb, accum in (("b4a1", 4, 1), ("b1a4", 1, 4)):
        trainer = make_trainer(ppo_dirs, name + "-".join(extra), per_device_train_batch_size=mb,
                               gradient_accumulation_steps=accum, max_grad_norm=1.0, clip_range_value=5.0, **extra)
        exp = fixed_experience(trainer)
        exp = trainer.advantages(exp)
        grads = record_grads(trainer)
        before = model_weights(trainer)
        stats = trainer.update(exp, step=1)
        weights = model_weights(trainer)
        assert_one_adamw_step(before, grads, weights, trainer.args)
        results.append((stats, grads, weights))
    (s1, g1, w1), (s2, g2, w2) = results
    assert abs(s1["actor_loss"] - s2["actor_loss"]) < 1e-6
    if extra:
        assert s1["ptx_loss"] > 0.1 and abs(s1["ptx_loss"] - s2["ptx_loss"]) < 1e-5 * s1["ptx_loss"]
    assert abs(s1["critic_loss"] - s2["critic_loss"]) < 1e-6 * max(1, abs(s1["critic_loss"]))
    assert set(g1) == set(g2) and len(g1) > 10
    for k in g1:
        # float32 sums of the same terms in another order: equal to ~1e-6 of the gradient scale
        scale = max(np.abs(g1[k]).max(), 1e-12)
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-4, atol=1e-5 * scale, err_msg=str(k))
    # Adam divides by |g|: where a gradient is ~0 (below 1e-4 of its tensor's largest), float-order
    # noise decides the step's sign, so there each run is only held to its own gradients' AdamW step
    # (assert_one_adamw_step above); elsewhere the two runs' weights agree to 1% of one step
    for (role, name), a in w1.items():
        g = g1.get((MODEL_CLASS[role], name))
        b = w2[(role, name)]
        clear = np.abs(g) > 1e-4 * np.abs(g).max() if g is not None else np.ones(a.shape, bool)
        np.testing.assert_allclose(a[clear], b[clear], rtol=0, atol=1e-5, err_msg=str(name))
    base = make_trainer(ppo_dirs, "base-weights")
    fixed_experience(base)  # same perturbation, no update
    moved = sum(int(np.abs(v.numpy() - w1[("actor", k)]).max() > 1e-5) for k, v in base.actor.state_dict().items())
    assert moved > 0.9 * len(base.actor.state_dict())  # the update really changed the weights


def test_recompute_gives_the_same_ppo_update(ppo_dirs):
    """recompute / critic_recompute change what backward keeps, not the update: one PPO update
    with full-layer recompute on actor and critic equals the one without, bit for bit on CPU."""
    results = []
    for name, flag in (("no-recompute", False), ("recompute", True)):
        trainer = make_trainer(ppo_dirs, name, recompute=flag, critic_recompute=flag)
        if flag:  # the switch really reached the decoder layers
            assert any(getattr(layer, "enable_recompute", False) for layer in trainer.actor.sublayers())
            assert any(getattr(layer, "enable_recompute", False) for layer in trainer.critic.sublayers())
        exp = trainer.advantages(fixed_experience(trainer))
        calls = []
        backbone = trainer.actor.llama
        original = backbone.recompute_training_full
        backbone.recompute_training_full = lambda *a, **k: calls.append(1) or original(*a, **k)
        trainer.update(exp, step=1)
        assert bool(calls) == flag  # the actor's layers were recomputed exactly when asked
        results.append({(role, k): v.numpy().copy() for role, model in (("actor", trainer.actor),
                                                                        ("critic", trainer.critic))
                        for k, v in model.state_dict().items()})
    plain, recomputed = results
    for key in plain:
        np.testing.assert_array_equal(plain[key], recomputed[key], err_msg=str(key))


def test_rollout_log_probs_give_the_same_ppo_update(ppo_dirs):
    """``rollout_log_probs``: old log-probs kept from the decode steps (sampling with temperature,
    top-k, top-p and a repetition penalty) instead of the actor's scoring forward give the same
    rollout (the recompute's old log-probs to 1e-5 on every action) and the same update."""
    from ppo.rollout.inference import InferenceModel

    sampling = dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, max_new_tokens=10,
                    clip_range_value=5.0, max_grad_norm=1.0)
    results = []
    for setting in ("false", "auto"):
        trainer = make_trainer(ppo_dirs, "rollout-lp-" + setting, rollout_log_probs=setting, **sampling)
        assert trainer.gen.keep_log_probs == (setting == "auto")  # auto: the lean decoder rolls out here
        rng = np.random.default_rng(5)  # the actor away from the reference: a non-zero KL
        for p in trainer.actor.parameters():
            p.set_value(p.numpy() + rng.normal(0, 0.02, p.shape).astype("float32"))
        scored = []
        original = InferenceModel.log_probs
        InferenceModel.log_probs = lambda self, *a, **k: scored.append(self.model) or original(self, *a, **k)
        try:
            paddle.seed(21)
            exp = trainer.rollout(0)
        finally:
            InferenceModel.log_probs = original
        # the actor's scoring forward is skipped exactly when the log-probs are kept
        assert (trainer.models.actor in scored) == (setting == "false") and trainer.models.reference in scored
        exp = trainer.advantages(exp)
        grads = record_grads(trainer)
        trainer.update(exp, step=1)
        results.append((exp, grads, model_weights(trainer)))
    (e1, g1, w1), (e2, g2, w2) = results
    np.testing.assert_array_equal(e1.sequences.numpy(), e2.sequences.numpy())
    action = e1.action_mask.numpy() > 0
    assert action.sum() > 20 and (e1.response_lengths.numpy() > 1).all()
    np.testing.assert_allclose(e2.old_log_probs.numpy()[action], e1.old_log_probs.numpy()[action], rtol=0, atol=1e-5)
    assert (e2.old_log_probs.numpy()[~action] == 0).all()
    for name in ("ref_log_probs", "values", "end_scores"):
        np.testing.assert_array_equal(getattr(e1, name).numpy(), getattr(e2, name).numpy(), err_msg=name)
    assert set(g1) == set(g2) and len(g1) > 10
    for k in g1:  # old log-probs within 1e-5: the same gradients to ~1e-4 of their scale
        scale = max(np.abs(g1[k]).max(), 1e-12)
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-3, atol=1e-4 * scale, err_msg=str(k))
    for (role, name), a in w1.items():  # (near-zero gradients: Adam's sign is float noise, as above)
        g = g1.get((MODEL_CLASS[role], name))
        clear = np.abs(g) > 1e-3 * np.abs(g).max() if g is not None else np.ones(a.shape, bool)
        np.testing.assert_allclose(a[clear], w2[(role, name)][clear], rtol=0, atol=2e-5, err_msg=str(name))


def test_packed_experience_moves_each_row_to_column_zero():
    """``Experience.packed`` against a naive per-row loop: real tokens from column 0, the per-token
    fields shifted with them, zeros after each row's end, width the longest real row."""
    rng = np.random.default_rng(1)
    B, P, R = 4, 6, 5
    mask = np.zeros((B, P + R), "int64")
    for b, (p, r) in enumerate([(6, 5), (2, 1), (4, 3), (3, 5)]):
        mask[b, P - p:P + r] = 1
    seqs = rng.integers(5, 99, size=mask.shape) * mask
    fields = {k: rng.normal(size=(B, P + R - 1)).astype("float32") for k in ("old_log_probs", "ref_log_probs",
                                                                                "values")}
    exp = Experience(sequences=paddle.to_tensor(seqs), attention_mask=paddle.to_tensor(mask),
                     action_mask=action_mask_of(paddle.to_tensor(mask), P),
                     end_scores=paddle.to_tensor(rng.normal(size=B).astype("float32")),
                     response_lengths=paddle.to_tensor(mask[:, P:].sum(1)), ended_with_eos=paddle.ones([B], "bool"),
                     prompt_length=P, **{k: paddle.to_tensor(v) for k, v in fields.items()})
    packed = exp.packed()
    W = int(mask.sum(1).max())
    assert packed.sequences.shape == [B, W] and packed.values.shape == [B, W - 1]
    action = action_mask_of(paddle.to_tensor(mask), P).numpy()
    for b in range(B):
        cols = np.nonzero(mask[b])[0]
        n = len(cols)
        np.testing.assert_array_equal(packed.sequences.numpy()[b, :n], seqs[b, cols])
        np.testing.assert_array_equal(packed.attention_mask.numpy()[b], [1] * n + [0] * (W - n))
        for k, v in fields.items():
            np.testing.assert_array_equal(getattr(packed, k).numpy()[b, :n - 1], v[b, cols[:-1]])
            assert (getattr(packed, k).numpy()[b, n - 1:] == 0).all()
        np.testing.assert_array_equal(packed.action_mask.numpy()[b, :n - 1], action[b, cols[:-1]])
        assert packed.action_mask.numpy()[b].sum() == action[b].sum()
    np.testing.assert_array_equal(packed.end_scores.numpy(), exp.end_scores.numpy())


def test_length_buckets_give_the_same_ppo_update(ppo_dirs):
    """Micro-batches sorted by length and packed to their own longest row: the same update as the
    padded ones (one token-mean per step), with fewer computed columns."""
    results = []
    for flag in (False, True):
        trainer = make_trainer(ppo_dirs, f"buckets-{flag}", length_buckets=flag, per_device_train_batch_size=2,
                               gradient_accumulation_steps=2, max_grad_norm=1.0, clip_range_value=5.0)
        exp = trainer.advantages(fixed_experience(trainer))
        shapes = []
        original = trainer.actor_step
        trainer.actor_step = lambda micro, *a: shapes.extend(m.sequences.shape for m in micro) or original(micro, *a)
        grads = record_grads(trainer)
        before = model_weights(trainer)
        stats = trainer.update(exp, step=1)
        weights = model_weights(trainer)
        assert_one_adamw_step(before, grads, weights, trainer.args)
        results.append((stats, grads, weights, shapes, exp))
    (s1, g1, w1, sh1, exp), (s2, g2, w2, sh2, _) = results
    L = exp.sequences.shape[1]
    assert all(s == [2, L] for s in sh1) and all(s[0] <= 2 and s[1] <= L for s in sh2)
    assert sum(r * w for r, w in sh2) < sum(r * w for r, w in sh1) - 2  # padding really went
    assert abs(s1["actor_loss"] - s2["actor_loss"]) < 1e-6
    assert abs(s1["critic_loss"] - s2["critic_loss"]) < 1e-6 * max(1, abs(s1["critic_loss"]))
    for k in g1:
        scale = max(np.abs(g1[k]).max(), 1e-12)
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-4, atol=1e-5 * scale, err_msg=str(k))
    for (role, name), a in w1.items():
        g = g1.get((MODEL_CLASS[role], name))
        clear = np.abs(g) > 1e-4 * np.abs(g).max() if g is not None else np.ones(a.shape, bool)
        np.testing.assert_allclose(a[clear], w2[(role, name)][clear], rtol=0, atol=1e-5, err_msg=str(name))
