import copy
import math

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from quada.approx.sites import resolve_decoder
from quada.defense.quada import (
    QuadAConfig,
    QuadATrainer,
    length_normalised_ipo_loss,
    noise_seed,
    pairwise_cosine_regularizer,
    perturbed_layers,
)
from quada.errors import QuadaError
from quada.testing import tiny_model

BIG_NOISE = "noise:site=up,dist=gaussian,std=0.5"


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                  report_to="none", bf16=False, save_strategy="no", tau=2, perturbation=BIG_NOISE,
                  dataloader_pin_memory=False, disable_tqdm=True)
    return QuadAConfig(**{**values, **overrides})


# --------------------------------------------------------------------------- pure pieces


def cosine_gradient_closed_form(f: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean pairwise cosine and its gradient: d cos(a,b)/da = b/(|a||b|) - (a.b) a/(|a|^3 |b|)."""
    n = len(f)
    norms = np.linalg.norm(f, axis=1)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    value = np.mean([f[i] @ f[j] / (norms[i] * norms[j]) for i, j in pairs])
    grad = np.zeros_like(f)
    for i, j in pairs:
        for a, b in ((i, j), (j, i)):
            grad[a] += f[b] / (norms[a] * norms[b]) - (f[a] @ f[b]) * f[a] / (norms[a] ** 3 * norms[b])
    return value, grad / len(pairs)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_regularizer_value_and_gradient_match_the_closed_form(n):
    f = np.random.default_rng(n).normal(size=(n, 5))
    features = torch.tensor(f, requires_grad=True)
    value = pairwise_cosine_regularizer(features)
    value.backward()
    expected_value, expected_grad = cosine_gradient_closed_form(f)
    assert value.item() == pytest.approx(expected_value, abs=1e-12)
    np.testing.assert_allclose(features.grad.numpy(), expected_grad, atol=1e-12)


def test_regularizer_of_fewer_than_two_prompts_is_zero():
    assert pairwise_cosine_regularizer(torch.ones(1, 4)).item() == 0.0
    assert pairwise_cosine_regularizer(torch.ones(0, 4)).item() == 0.0


def test_length_normalised_ipo_loss_and_its_gradient_match_the_closed_form():
    chosen, rejected = np.array([-2.0, 1.5, 0.3]), np.array([-6.0, -0.5, 2.0])
    chosen_tokens, rejected_tokens = np.array([4.0, 3.0, 1.0]), np.array([12.0, 5.0, 7.0])
    tau = 0.5
    # h = chosen/|y_w| - rejected/|y_l|: -0.5 - (-0.5) = 0, 0.5 - (-0.1) = 0.6, 0.3 - 2/7
    h = np.array([0.0, 0.6, 0.3 - 2.0 / 7.0])
    expected = (h - 1.0 / (2.0 * tau)) ** 2
    assert expected[:2] == pytest.approx([1.0, 0.16])
    c = torch.tensor(chosen, requires_grad=True)
    r = torch.tensor(rejected, requires_grad=True)
    losses = length_normalised_ipo_loss(c, r, torch.tensor(chosen_tokens), torch.tensor(rejected_tokens), tau)
    np.testing.assert_allclose(losses.detach().numpy(), expected, atol=1e-12)
    losses.sum().backward()
    # d/dc (h - 1/(2 tau))^2 = 2 (h - 1/(2 tau)) / |y_w|, and minus that over |y_l| for the rejected one.
    np.testing.assert_allclose(c.grad.numpy(), 2 * (h - 1 / (2 * tau)) / chosen_tokens, atol=1e-12)
    np.testing.assert_allclose(r.grad.numpy(), -2 * (h - 1 / (2 * tau)) / rejected_tokens, atol=1e-12)


def test_length_normalisation_cancels_an_offset_per_token():
    """A perturbation that lowers every token's log-probability by the same amount shifts a summed
    log-ratio by that amount times the length: DPO's margin moves with the length difference, the
    normalised margin does not."""
    chosen, rejected = torch.tensor([-1.0]), torch.tensor([-3.0])
    chosen_tokens, rejected_tokens = torch.tensor([5.0]), torch.tensor([40.0])
    offset = -0.2  # per token
    base = length_normalised_ipo_loss(chosen, rejected, chosen_tokens, rejected_tokens, 0.1)
    shifted = length_normalised_ipo_loss(chosen + offset * chosen_tokens, rejected + offset * rejected_tokens,
                                         chosen_tokens, rejected_tokens, 0.1)
    assert shifted.item() == pytest.approx(base.item(), abs=1e-12)
    summed_margin = (chosen + offset * chosen_tokens) - (rejected + offset * rejected_tokens)
    assert summed_margin.item() == pytest.approx((chosen - rejected).item() + offset * (5 - 40))


def test_noise_seeds_are_fixed_by_seed_step_and_draw():
    assert noise_seed(0, 5, 1) == noise_seed(0, 5, 1)
    assert len({noise_seed(s, t, d) for s in (0, 1) for t in (0, 1) for d in (0, 1)}) == 8


def test_perturbed_layers_per_mode():
    assert perturbed_layers("first-tau", 2, 4) == (0, 1)
    assert perturbed_layers("all", 2, 4) == (0, 1, 2, 3)
    assert perturbed_layers("none", 2, 4) == ()
    with pytest.raises(QuadaError, match="tau=5 exceeds"):
        perturbed_layers("first-tau", 5, 4)


# --------------------------------------------------------------------------- configuration


def test_defaults_follow_the_paper(tmp_path):
    full = QuadAConfig(output_dir=str(tmp_path), use_lora=False)
    assert (full.beta, full.learning_rate, full.weight_decay, full.num_train_epochs, full.max_length) == (
        0.1, 1e-6, 0.05, 2.0, 512)
    assert full.lr_scheduler_type == "cosine" and full.warmup_steps == 0.03
    assert QuadAConfig(output_dir=str(tmp_path)).learning_rate == 5e-5  # LoRA


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(perturbation="warp-drive"), "unknown approximation"),
        (dict(perturbation="noise:site=up,dist=gaussian,std=0.1,layers=0:2"), "names its own layers"),
        (dict(tau=0), "tau must be"),
        (dict(perturb_layers="middle"), "unknown perturb_layers"),
        (dict(reg_lambda=-1.0), "reg_lambda"),
        (dict(reg_pooling="max"), "unknown reg_pooling"),
        (dict(lora_r=0), "lora_r"),
        (dict(lora_target_modules=[]), "lora_target_modules"),
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(beta=float("nan")), "beta must be a finite number above 0, got nan"),
        (dict(beta=-1.0), "beta must be a finite number above 0"),
        (dict(num_train_epochs=0.0), "num_train_epochs must be a finite number above 0"),
        (dict(lora_alpha=float("nan")), "lora_alpha must be a finite number above 0"),
        (dict(lora_r=2.5), "lora_r must be a whole number"),
        (dict(reg_lambda=float("inf")), "reg_lambda must be a finite number of at least 0"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(warmup_steps=float("nan")), "warmup_steps"),
        (dict(max_grad_norm=float("nan")), "max_grad_norm"),
        (dict(per_device_train_batch_size=0), "per_device_train_batch_size must be a whole number of at least 1"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
        (dict(max_steps=0), "max_steps"),
        (dict(seed=-5), "seed must be a whole number from 0"),
        (dict(activation_checkpointing=True), "checkpointing cannot be used"),
        (dict(reference="frozen"), "unknown reference 'frozen'"),
        (dict(reference="perturbed", perturb_layers="none"), "a perturbed reference needs a perturbation"),
        (dict(preference_loss="kto"), "unknown preference_loss 'kto'"),
        (dict(preference_loss="ipo", loss_type=["hinge"]), "leave loss_type at 'sigmoid'"),
    ],
)
def test_bad_configuration_is_a_clear_error(tmp_path, overrides, message):
    with pytest.raises(QuadaError, match=message):
        QuadAConfig(output_dir=str(tmp_path), **overrides)


def test_a_perturbed_reference_is_never_precomputed(tmp_path):
    assert QuadAConfig(output_dir=str(tmp_path)).precompute_ref_log_probs
    assert not QuadAConfig(output_dir=str(tmp_path), reference="perturbed").precompute_ref_log_probs


def test_checkpointing_is_allowed_for_plain_dpo(tmp_path):
    assert QuadAConfig(output_dir=str(tmp_path), perturb_layers="none", activation_checkpointing=True).activation_checkpointing


# --------------------------------------------------------------------------- the trainer


class PerturbationSpy:
    """Per forward of a model: which decoder layers ran perturbed, and whether grad was on.

    A layer is perturbed when the input of its q projection differs from its attention norm
    applied (without hooks) to the layer's input, i.e. it is checked on the activations."""

    def __init__(self, model):
        self.forwards: list[tuple[bool, set[int]]] = []
        self.handles = []
        layers = resolve_decoder(model).layers
        layer_inputs = {}

        def on_layer(index):
            def hook(_module, args, kwargs):
                layer_inputs[index] = (kwargs.get("hidden_states") if args == () else args[0]).detach()
                if index == 0:
                    self.forwards.append((torch.is_grad_enabled(), set()))
            return hook

        def on_q(index, norm):
            def hook(_module, args):
                clean = norm.forward(layer_inputs[index])  # .forward skips the norm's hooks
                if not torch.allclose(args[0].detach(), clean):
                    self.forwards[-1][1].add(index)
            return hook

        for sites in layers:
            self.handles.append(sites.layer.register_forward_pre_hook(on_layer(sites.index), with_kwargs=True))
            self.handles.append(sites.linears["q"].register_forward_pre_hook(on_q(sites.index, sites.attn_norm)))

    def policy(self):
        return [layers for grad, layers in self.forwards if grad]

    def reference(self):
        return [layers for grad, layers in self.forwards if not grad]


@pytest.mark.parametrize("reference", ["precomputed", "adapter-disabled", "ref-model"])
def test_only_the_first_tau_layers_of_the_policy_are_perturbed_never_the_reference(tmp_path, reference, pairs_dataset):
    model, tokenizer = tiny_model("qwen2", seed=0, layers=4)
    ref_model = copy.deepcopy(model) if reference == "ref-model" else None
    spy = PerturbationSpy(model)
    ref_spy = PerturbationSpy(ref_model) if ref_model is not None else spy
    args = config(tmp_path, precompute_ref_log_probs=reference == "precomputed", use_lora=reference != "ref-model")
    trainer = QuadATrainer(model, ref_model=ref_model, args=args, train_dataset=pairs_dataset,
                           processing_class=tokenizer)
    trainer.train()
    assert spy.policy() and all(layers == {0, 1} for layers in spy.policy())
    assert ref_spy.reference() and all(layers == set() for layers in ref_spy.reference())


@pytest.mark.parametrize("use_lora", [True, False])
def test_a_perturbed_reference_runs_under_the_policys_own_noise_draw(tmp_path, use_lora, pairs_dataset):
    model, tokenizer = tiny_model("qwen2", seed=0, layers=3)
    ref_model = None if use_lora else copy.deepcopy(model)
    spy = PerturbationSpy(model)
    ref_spy = spy if use_lora else PerturbationSpy(ref_model)
    args = config(tmp_path, reference="perturbed", use_lora=use_lora, warmup_steps=0)  # the first step updates
    trainer = QuadATrainer(model, ref_model=ref_model, args=args, train_dataset=pairs_dataset, processing_class=tokenizer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    # Every step: one reference forward, then the policy's, both with layers 1..tau perturbed.
    assert len(ref_spy.reference()) == len(spy.policy()) == 2
    assert all(layers == {0, 1} for layers in ref_spy.reference() + spy.policy())
    logs = [h for h in trainer.state.log_history if "dpo_loss" in h]
    # Before the first update policy and reference are one model under one draw: every reward is 0 and the
    # DPO loss is log 2. QuadA's clean reference starts elsewhere (the next test).
    assert logs[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert logs[0]["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert logs[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert any(not torch.equal(dict(trainer.model.named_parameters())[n], p) for n, p in before.items())
    assert logs[1]["rewards/margins"] != 0.0


def test_a_clean_reference_counts_the_noise_as_reward_before_any_update(tmp_path, pairs_dataset):
    model, tokenizer = tiny_model("qwen2", seed=0, layers=3)
    trainer = QuadATrainer(model, args=config(tmp_path, max_steps=1), train_dataset=pairs_dataset,
                           processing_class=tokenizer)
    trainer.train()
    (first,) = [h for h in trainer.state.log_history if "dpo_loss" in h]
    # The policy has not moved (the first step's learning rate is 0 in the warmup), yet its rewards are not 0:
    # they measure what the noise did to the log-probabilities.
    assert first["learning_rate"] == 0
    assert abs(first["rewards/chosen"]) > 1e-3 and abs(first["rewards/rejected"]) > 1e-3


def test_the_ipo_arm_trains_on_the_length_normalised_loss(tmp_path, pairs_dataset):
    model, tokenizer = tiny_model("qwen2", seed=1)
    args = config(tmp_path, preference_loss="ipo", reference="perturbed", beta=0.5, max_steps=3, warmup_steps=0)
    trainer = QuadATrainer(model, args=args, train_dataset=pairs_dataset, processing_class=tokenizer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert any(not torch.equal(dict(trainer.model.named_parameters())[n], p) for n, p in before.items())
    logs = [h for h in trainer.state.log_history if "ipo_loss" in h]
    assert len(logs) == 3 and not any("dpo_loss" in h for h in trainer.state.log_history)
    for log in logs:
        assert log["loss"] == pytest.approx(log["ipo_loss"] - 0.1 * log["regularizer"], rel=1e-5)
    # At the start the margins are 0 (perturbed reference), so the loss is the target squared: (1/(2 tau))^2 = 1.
    assert logs[0]["ipo/margins"] == pytest.approx(0.0, abs=1e-6)
    assert logs[0]["ipo_loss"] == pytest.approx(1.0, abs=1e-5)
    # Training moves the normalised margin toward its target 1/(2 tau) = 1 and the loss down.
    assert logs[-1]["ipo/margins"] > 0 and logs[-1]["ipo_loss"] < logs[0]["ipo_loss"]


def test_the_ipo_loss_is_recomputed_from_the_policy_forward(tmp_path, pairs_dataset):
    """The IPO loss the trainer logs equals the closed form applied to log-probabilities computed
    independently (the same model, the same batch, no perturbation, a clean precomputed reference)."""
    model, tokenizer = tiny_model("qwen2", seed=2)
    args = config(tmp_path, preference_loss="ipo", perturb_layers="none", reg_lambda=0.0, max_steps=1,
                  per_device_train_batch_size=8, beta=0.25)
    trainer = QuadATrainer(model, args=args, train_dataset=pairs_dataset, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v for k, v in batch.items() if k != "harmful"}
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    scored = batch["completion_mask"][:, 1:].float()
    sums, tokens = (logps * scored).sum(1), scored.sum(1)
    chosen, rejected = (sums - torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])).chunk(2)
    expected = length_normalised_ipo_loss(chosen, rejected, *tokens.chunk(2), 0.25).mean().item()
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "ipo_loss" in h]
    assert log["ipo_loss"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_two_steps_change_the_trainable_parameters_and_log_the_loss_terms(tmp_path, arch, pairs_dataset):
    model, tokenizer = tiny_model(arch, seed=1)
    trainer = QuadATrainer(model, args=config(tmp_path), train_dataset=pairs_dataset,
                           processing_class=tokenizer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert before and all("lora" in n for n in before)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in before.items())
    logs = [h for h in trainer.state.log_history if "dpo_loss" in h]
    assert len(logs) == 2
    for log in logs:
        assert {"regularizer", "rewards/margins"} <= set(log)
        assert -1 <= log["regularizer"] <= 1 and math.isfinite(log["rewards/margins"])
        assert log["loss"] == pytest.approx(log["dpo_loss"] - 0.1 * log["regularizer"], rel=1e-5)


def test_the_ablation_switches_do_what_they_say(tmp_path, pairs_dataset):
    seen = {}
    for mode in ("none", "all"):
        model, tokenizer = tiny_model("qwen2", seed=0, layers=3)
        spy = PerturbationSpy(model)
        QuadATrainer(model, args=config(tmp_path / mode, perturb_layers=mode), train_dataset=pairs_dataset,
                     processing_class=tokenizer).train()
        seen[mode] = spy.policy()
    assert seen["none"] and all(layers == set() for layers in seen["none"])
    assert seen["all"] and all(layers == {0, 1, 2} for layers in seen["all"])

    model, tokenizer = tiny_model("qwen2", seed=0)
    trainer = QuadATrainer(model, args=config(tmp_path / "noreg", reg_lambda=0.0),
                           train_dataset=pairs_dataset.remove_columns("harmful"), processing_class=tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "dpo_loss" in h]
    assert logs and all(log["loss"] == log["dpo_loss"] for log in logs)


def test_the_regularizer_pulls_harmful_prompts_first_layer_activations_together(tmp_path, pairs_dataset):
    def cosines(reg_lambda):
        model, tokenizer = tiny_model("qwen2", seed=0)
        args = config(tmp_path / str(reg_lambda), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3,
                      reg_lambda=reg_lambda)
        trainer = QuadATrainer(model, args=args, train_dataset=pairs_dataset, processing_class=tokenizer)
        trainer.train()
        return [h["regularizer"] for h in trainer.state.log_history if "regularizer" in h]

    without, weighted = cosines(0.0), cosines(50.0)
    assert without[0] == pytest.approx(weighted[0])  # the same start: same weights, data and noise
    # Trained with the term, the same batches (and noise draws) end with more similar activations.
    assert all(w > u for w, u in zip(weighted[2:], without[2:]))


def test_fresh_noise_every_forward_but_a_rerun_draws_the_same(tmp_path, pairs_dataset):
    def losses(run):
        model, tokenizer = tiny_model("qwen2", seed=0)
        args = config(tmp_path / run, max_steps=3, per_device_train_batch_size=8, learning_rate=1e-12)
        trainer = QuadATrainer(model, args=args, train_dataset=pairs_dataset,
                               processing_class=tokenizer)
        trainer.train()
        return [h["dpo_loss"] for h in trainer.state.log_history if "dpo_loss" in h]

    first, second = losses("a"), losses("b")
    assert first == second
    assert len(set(first)) == 3  # same batch, almost no update: only the noise differs between steps


class StopAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


def test_a_resumed_run_ends_with_exactly_the_uninterrupted_parameters(tmp_path, pairs_dataset):

    def run(out, resume=False, interrupt=False):
        model, tokenizer = tiny_model("qwen2", seed=0)
        args = config(tmp_path / out, max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
        trainer = QuadATrainer(model, args=args, train_dataset=pairs_dataset, processing_class=tokenizer,
                               callbacks=[StopAfterSave()] if interrupt else None)
        trainer.train(resume_from_checkpoint=resume or None)
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}, trainer

    whole, _ = run("whole")
    with pytest.raises(KeyboardInterrupt):
        run("split", interrupt=True)
    assert (tmp_path / "split" / "out" / "checkpoint-2").is_dir()
    resumed, trainer = run("split", resume=True)
    assert trainer.state.global_step == 4
    assert all(torch.equal(resumed[n], p) for n, p in whole.items())


def test_missing_harmful_flags_and_a_too_large_tau_are_clear_errors(tmp_path, pairs_dataset):
    model, tokenizer = tiny_model("qwen2", seed=0)
    with pytest.raises(QuadaError, match="'harmful' column"):
        QuadATrainer(model, args=config(tmp_path), train_dataset=pairs_dataset.remove_columns(
            "harmful"), processing_class=tokenizer)
    with pytest.raises(QuadaError, match="tau=3 exceeds"):
        QuadATrainer(model, args=config(tmp_path, tau=3), train_dataset=pairs_dataset,
                     processing_class=tokenizer)


def test_pair_lengths_predict_the_pairs_that_the_trainer_drops_at_max_length(tmp_path):
    """A pair whose prompt alone fills max_length leaves training; ``pair_lengths`` counts it so, in
    the tokens of the model's chat template."""
    from datasets import Dataset

    from quada.defense.pairs import PreferencePair, pair_lengths, preference_rows

    model, tokenizer = tiny_model("qwen2")
    pairs = [PreferencePair(f"p{i}", "q" * (1 + 30 * i), "No.", "Yes, here it is.", True, "test") for i in range(4)]
    lengths = pair_lengths(tokenizer, pairs, "plain")
    assert lengths.prompts == tuple(sorted(lengths.prompts)) and lengths.prompts[1] < 60 <= lengths.prompts[2]
    assert all(total > prompt for prompt, total in zip(lengths.prompts, lengths.totals))
    assert lengths.dropped(60) == [2, 3] and lengths.dropped(max(lengths.prompts) + 1) == []
    trainer = QuadATrainer(model, args=config(tmp_path, max_length=60, tau=1), processing_class=tokenizer,
                           train_dataset=Dataset.from_list(preference_rows(pairs, "plain")))
    assert len(trainer.train_dataset) == len(pairs) - len(lengths.dropped(60))
