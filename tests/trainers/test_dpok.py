"""DPOK: the replay buffer, the loss terms against independent computations, the value baseline, exact resume and
a learning test."""

from __future__ import annotations

import torch

from diffrl.trainers.dpok import TransitionBuffer, pooled_text_embeddings
from diffrl.training import build_run
from diffrl.trajectory import TextConditioning, Trajectory
from tests.conftest import perturb_lora
from tests.fixtures import RECOMPUTE_ATOL, assert_same_gradients, fast_config, learning_run, straight_and_resumed_states

PROMPTS = ["a red circle", "a blue square"]


def _config(*overrides):
    return fast_config("trainer=dpok", "sample.eta=1.0", "sample.batch_size=2", "dpok.v_batch_size=8", *overrides)


def _run(tmp_path, *overrides):
    return build_run(_config(*overrides), tmp_path)


def _fill_buffer(run):
    """One rollout's transitions, as step 1 of a round stores them."""
    with torch.no_grad():
        traj = run.sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
        rewards = run.reward(traj.images, PROMPTS)
    run.trainer.buffer.add(traj, rewards, pooled_text_embeddings(run.sampler, PROMPTS), run.sampler.stochastic_steps)
    return traj, rewards


def _toy_trajectory(batch: int, steps: int, offset: float) -> Trajectory:
    latents = offset + torch.arange(batch * (steps + 1), dtype=torch.float32).view(batch, steps + 1, 1, 1, 1)
    return Trajectory(prompts=[f"p{offset + row}" for row in range(batch)],
                      conditioning=TextConditioning(torch.zeros(batch, 1, 1)), latents=latents,
                      timesteps=torch.arange(steps), images=torch.zeros(batch, 3, 1, 1), log_probs=-latents[:, :-1, 0, 0, 0])


def test_buffer_is_step_major_and_first_in_first_out():
    buffer = TransitionBuffer(capacity=5)
    # batch 2, 3 steps: latents row 0 = [0, 1, 2, 3], row 1 = [4, 5, 6, 7]
    buffer.add(_toy_trajectory(2, 3, 0.0), torch.tensor([10.0, 20.0]), torch.tensor([[1.0], [2.0]]), [0, 1, 2])
    assert buffer.steps.tolist() == [0, 1, 1, 2, 2]       # 6 transitions, the oldest (step 0, row 0) dropped
    assert buffer.latents.flatten().tolist() == [4.0, 1.0, 5.0, 2.0, 6.0]
    assert buffer.next_latents.flatten().tolist() == [5.0, 2.0, 6.0, 3.0, 7.0]
    assert buffer.log_probs.tolist() == [-4.0, -1.0, -5.0, -2.0, -6.0]
    assert buffer.rewards.tolist() == [20.0, 10.0, 20.0, 10.0, 20.0]
    assert buffer.prompts == ["p1.0", "p0.0", "p1.0", "p0.0", "p1.0"]
    assert buffer.text_embeds.flatten().tolist() == [2.0, 1.0, 2.0, 1.0, 2.0]
    buffer.add(_toy_trajectory(1, 3, 100.0), torch.tensor([30.0]), torch.tensor([[3.0]]), [0, 1, 2])
    assert buffer.latents.flatten().tolist() == [2.0, 6.0, 100.0, 101.0, 102.0]
    rows = buffer.random_rows(3, torch.Generator().manual_seed(0))
    assert len(set(rows.tolist())) == 3 and buffer.random_rows(9, torch.Generator()).numel() == 5


def test_buffer_keeps_only_the_given_stochastic_steps():
    """A last step with σ = 0 (set_alpha_to_one) has no density: only steps 0 and 1 of 3 enter the buffer."""
    buffer = TransitionBuffer(capacity=10)
    buffer.add(_toy_trajectory(2, 3, 0.0), torch.tensor([10.0, 20.0]), torch.tensor([[1.0], [2.0]]), [0, 1])
    assert buffer.steps.tolist() == [0, 0, 1, 1]
    assert buffer.latents.flatten().tolist() == [0.0, 4.0, 1.0, 5.0]
    assert buffer.next_latents.flatten().tolist() == [1.0, 5.0, 2.0, 6.0]
    assert buffer.log_probs.tolist() == [-0.0, -4.0, -1.0, -5.0]


def test_buffer_loads_its_state_and_an_older_one_with_former_names_and_the_capacity():
    buffer = TransitionBuffer(capacity=5)
    buffer.add(_toy_trajectory(2, 3, 0.0), torch.tensor([10.0, 20.0]), torch.tensor([[1.0], [2.0]]), [0, 1, 2])
    current = buffer.state_dict()
    former = {**current, "capacity": 5, "states": current["latents"], "next_states": current["next_latents"]}
    del former["latents"], former["next_latents"]   # the keys of checkpoints written before the rename
    for state in (current, former):
        restored = TransitionBuffer(capacity=5)
        restored.load_state_dict(state, torch.device("cpu"))
        assert restored.prompts == buffer.prompts
        assert all(torch.equal(getattr(restored, name), getattr(buffer, name)) for name in TransitionBuffer.TENSORS)


def test_policy_term_at_ratio_one_is_minus_alpha_times_the_mean_advantage(tmp_path):
    run = _run(tmp_path, "dpok.kl_weight=0.0", "dpok.reward_weight=10.0")
    _fill_buffer(run)
    rows = torch.tensor([0, 3, 5])
    trainer, buffer = run.trainer, run.trainer.buffer
    trainer._train_value()                     # V_net starts at 0; one step makes the baseline differ per row
    with torch.no_grad():                      # V = mean + std · V_net over the buffer's rewards
        standardised = trainer.value_net(buffer.latents[rows], buffer.text_embeds[rows], buffer.steps[rows])
    assert standardised.abs().min() > 0
    baseline = buffer.rewards.mean() + buffer.rewards.std(correction=0) * standardised
    loss, parts = trainer.policy_loss(rows)
    torch.testing.assert_close(parts["ratio"], torch.tensor(1.0), atol=RECOMPUTE_ATOL, rtol=0)   # fresh transitions
    torch.testing.assert_close(loss, -10.0 * (buffer.rewards[rows] - baseline).mean(), atol=1e-5, rtol=1e-5)


def test_kl_term_gradient_is_that_of_the_squared_cfg_noise_difference(tmp_path):
    """β·mean((ε̂_θ − ε̂_ref)²) on CFG-combined predictions, reference = LoRA off, against direct UNet calls."""
    run = _run(tmp_path, "dpok.reward_weight=0.0", "dpok.kl_weight=1.0", "dpok.value_network=false")
    _fill_buffer(run)
    rows = torch.tensor([1, 6])
    loss, parts = run.trainer.policy_loss(rows)
    assert loss.item() == 0.0                  # LoRA up-projections start at zero: the model is its reference
    perturb_lora(run.pipe.unet)
    params = [p for p in run.pipe.unet.parameters() if p.requires_grad]
    loss, _ = run.trainer.policy_loss(rows)
    ours = torch.autograd.grad(loss, params)

    buffer, sampler, unet = run.trainer.buffer, run.sampler, run.pipe.unet
    x, t = buffer.latents[rows], sampler.timesteps[buffer.steps[rows]]
    halves = sampler.encode_prompts([buffer.prompts[row] for row in rows.tolist()])
    cond, uncond = (half.prompt_embeds for half in halves)
    scale = run.config.sample.guidance_scale

    def guided_noise():
        uncond_out = unet(x, t, encoder_hidden_states=uncond).sample
        cond_out = unet(x, t, encoder_hidden_states=cond).sample
        return uncond_out + scale * (cond_out - uncond_out)

    with torch.no_grad():
        unet.disable_adapters()
        reference = guided_noise()
        unet.enable_adapters()
    expected = torch.autograd.grad(((guided_noise() - reference) ** 2).mean(), params)
    assert loss.item() > 0
    assert_same_gradients(list(ours), list(expected))   # one batched CFG call vs two calls: summation order only


def test_value_network_fits_the_rewards(tmp_path):
    run = _run(tmp_path, "dpok.v_lr=1.0e-3", "reward=compressibility")
    _fill_buffer(run)
    first = run.trainer._train_value().item()
    for _ in range(40):
        last = run.trainer._train_value().item()
    assert last < 0.2 * first, f"value loss {first:.4f} -> {last:.4f}"


def test_value_baseline_follows_an_affine_change_of_the_reward(tmp_path):
    """V learns standardised rewards, so rewards r and 0.47 + 0.001·r (brightness's scale) give the baselines
    b and 0.47 + 0.001·b: a small reward spread is fitted as well as a large one."""
    baselines = []
    for scale, shift in ((1.0, 0.0), (1e-3, 0.47)):
        run = _run(tmp_path / str(scale), "dpok.v_lr=1.0e-3", "reward=compressibility")
        _fill_buffer(run)
        run.trainer.buffer.rewards = shift + scale * run.trainer.buffer.rewards
        for _ in range(10):
            run.trainer._train_value()
        baselines.append(run.trainer.baseline(torch.arange(len(run.trainer.buffer))))
    large, small = baselines
    assert large.std() > 0
    torch.testing.assert_close(small, 0.47 + 1e-3 * large, rtol=0, atol=1e-6)


def test_resume_continues_exactly_with_buffer_and_value_network(tmp_path):
    state_a, state_b = straight_and_resumed_states(_config, tmp_path, "dpok.buffer_size=20")
    assert state_a["round"] == state_b["round"] == 4
    assert all(torch.equal(state_a["value_net"][k], state_b["value_net"][k]) for k in state_a["value_net"])
    assert state_a["buffer"]["prompts"] == state_b["buffer"]["prompts"]
    assert torch.equal(state_a["buffer"]["latents"], state_b["buffer"]["latents"])
    assert len(state_a["buffer"]["prompts"]) == 20


def test_learning_raises_brightness(tmp_path):
    """DPOK's policy and KL terms in their most on-policy setting (the buffer holds one round, one policy step over
    all of it) with the value baseline on the raw brightness, whose spread is only ~0.004: the standardised value
    network still gives a useful baseline (a raw-reward regression from a random start did not). α = 1000 is the
    many-prompt preset's. Measured: 0.4732 -> 0.4845 in 15 rounds; with α = -1000 it falls to 0.4690."""
    torch.set_num_threads(2)
    run = _run(tmp_path, "reward=brightness", "sample.batch_size=16",
               "sample.guidance_scale=1.0", "train.learning_rate=1.0e-2",
               "dpok.reward_weight=1000", "dpok.buffer_size=64", "dpok.p_batch_size=64", "dpok.p_step=1")
    before, after, lora_change = learning_run(run, steps=15, batch_size=16)
    assert lora_change > 1e-3
    assert after - before > 0.005, f"brightness {before:.4f} -> {after:.4f}"
