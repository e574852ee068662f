"""QuadA, approximation-aware alignment, as a thin layer over TRL's DPO.

The loss of Zhang et al., arXiv 2502.00840 (PAPER.md section 5):

    L = -E log sigmoid( b*log(pi_eps(y_w|x)/pi_0(y_w|x)) - b*log(pi_eps(y_l|x)/pi_0(y_l|x)) )
        - lambda * E_{x_i,x_j harmful} cos( f1_eps(x_i), f1_eps(x_j) )

- ``pi_eps`` is the policy with the most vulnerable approximation (the MVA; here any approximation
  spec) injected into decoder layers 1..tau (indices ``0..tau-1``); the later layers run clean;
- ``pi_0`` is the original model and runs clean: its log-probabilities are precomputed before
  training (the default), or computed by a separate reference model, or by the policy with its
  LoRA adapter disabled, always *before* the perturbation is installed for the policy forward.
  With ``reference="perturbed"`` [ours] it runs under the same approximation as the policy, with
  the same noise draw, so that before any update policy and reference agree and every implicit
  reward starts at 0 (the approximation's own drop in log-probability is no longer counted as
  reward);
- ``f1_eps(x)`` is the output of the first decoder layer over the prompt tokens, pooled to one
  vector (``last`` prompt token or ``mean`` over them, as in the cluster analysis), taken from the
  same perturbed forward.

How harmful prompts are known: the training dataset carries a boolean column ``harmful`` (True for
a harmful request, False for a benign one); :class:`HarmfulPreferenceCollator` carries it into the
batch, and the regularizer pools the chosen half's rows (the rejected half repeats the same prompts).

``preference_loss="ipo"`` [ours] replaces the DPO term by IPO's squared loss on length-normalised
log-ratios (:func:`length_normalised_ipo_loss`), with ``beta`` as IPO's tau.

Every perturbed forward draws fresh noise from a seed derived from ``seed``, the global step and
the forward's index within the step (:func:`noise_seed`), so a resumed run draws exactly the noise
an uninterrupted run would have drawn; a perturbed reference uses its policy forward's seed.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from quada.approx import apply, as_spec
from quada.approx.sites import capturing, resolve_decoder
from quada.errors import QuadaError, check_seed
from quada.measures.batching import POOLINGS, pool_prompt_activations
from quada.seeds import derived_seed

HARMFUL_COLUMN = "harmful"
DEFAULT_PERTURBATION = "noise:site=up,dist=gaussian,std=0.075"
PERTURB_LAYERS = ("first-tau", "all", "none")
REFERENCES = ("clean", "perturbed")  # how the reference model runs
PREFERENCE_LOSSES = ("dpo", "ipo")  # the preference term of the loss
FULL_FINETUNE_LR = 1e-6  # the paper's rate (PAPER.md section 5)
DEFAULT_MAX_LENGTH = 512  # the longest prompt+response trained on, in tokens (the paper's)
# [ours] LoRA trains a low-rank update that starts at zero, so at the paper's 1e-6 it barely moves in the
# few hundred steps a CPU run affords; 5e-5 is a common LoRA rate, about 50x the full fine-tuning one.
LORA_LR = 5e-5
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Training numbers that TrainingArguments and TRL take without complaint but that train nothing or
# train to NaN: each must be finite and above (or, for the second group, at least) zero.
POSITIVE_FIELDS = ("beta", "learning_rate", "num_train_epochs", "save_steps", "logging_steps")
NON_NEGATIVE_FIELDS = ("reg_lambda", "weight_decay", "warmup_steps", "max_grad_norm")
COUNT_FIELDS = ("per_device_train_batch_size", "gradient_accumulation_steps")  # whole numbers >= 1


# --------------------------------------------------------------------------- pure pieces


def pairwise_cosine_regularizer(features: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity ``2/(n(n-1)) * sum_{i<j} cos(f_i, f_j)`` of the rows of
    ``features`` (n, dim): the term QuadA maximizes, weighted by lambda, over the first-layer
    activations of the harmful prompts in a batch (PAPER.md section 5). Fewer than two rows have
    no pair: the value is 0."""
    n = features.shape[0]
    if n < 2:
        return features.new_zeros(())
    unit = F.normalize(features, dim=-1, eps=1e-12)
    similarity = unit @ unit.T
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=features.device), diagonal=1)
    return similarity[upper].mean()


def length_normalised_ipo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
                               chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, tau: float) -> torch.Tensor:
    """Per pair, IPO's squared loss on length-normalised log-ratios:

        (h - 1/(2 tau))^2,   h = log(pi(y_w|x)/pi_ref(y_w|x)) / |y_w| - log(pi(y_l|x)/pi_ref(y_l|x)) / |y_l|

    The squared loss and its target 1/(2 tau) are the empirical IPO loss of Azar et al., "A General
    Theoretical Paradigm to Understand Learning from Human Preferences" (AISTATS 2024, arXiv
    2310.12036), eq. 17, where ``h`` is a difference of sequence log-ratios. Dividing each
    log-ratio by its response's token count ``|y|`` makes the reward a per-token mean, the length
    normalisation of SimPO's reward (Meng et al., arXiv 2405.14734, eq. 4) applied to IPO's log-ratio
    (TRL's ``ipo`` loss normalises the same way). ``*_logratios`` are summed log-probabilities of
    the policy minus the reference's, ``*_tokens`` the token counts (at least 1), all of shape (pairs,).
    """
    margin = chosen_logratios / chosen_tokens - rejected_logratios / rejected_tokens
    return (margin - 1.0 / (2.0 * tau)) ** 2


def noise_seed(seed: int, step: int, draw: int) -> int:
    """The seed of one perturbed forward: fixed by the run seed, the global step and the forward's
    index within the step, never by run history, so a resumed run draws the same noise."""
    return derived_seed("quada", seed, step, draw)


def check_number(name: str, value, minimum: float, *, above: bool = False, whole: bool = False) -> None:
    """Raise a ``QuadaError`` naming ``name`` unless ``value`` is a finite number at least ``minimum``
    (above it with ``above``), and a whole one with ``whole``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if number and (value > minimum if above else value >= minimum) and (not whole or float(value).is_integer()):
        return
    kind = "a whole number" if whole else "a finite number"
    raise QuadaError(f"{name} must be {kind} {'above' if above else 'of at least'} {minimum:g}, got {value}")


def perturbed_layers(mode: str, tau: int, num_layers: int) -> tuple[int, ...]:
    """Decoder indices that run perturbed: ``0..tau-1`` (``first-tau``, the paper's layers 1..tau),
    every layer (``all``) or none (``none``, plain DPO)."""
    if mode not in PERTURB_LAYERS:
        raise QuadaError(f"unknown perturb_layers {mode!r}; choose one of {', '.join(PERTURB_LAYERS)}")
    if mode == "none":
        return ()
    if mode == "all":
        return tuple(range(num_layers))
    if tau > num_layers:
        raise QuadaError(f"tau={tau} exceeds the model's {num_layers} decoder layers; choose tau between 1 and {num_layers}")
    return tuple(range(tau))


# --------------------------------------------------------------------------- configuration


@dataclass
class QuadAConfig(DPOConfig):
    """DPO's configuration plus QuadA's fields; defaults follow the paper where it gives them
    (beta 0.1, lr 1e-6 for full fine-tuning, cosine schedule, warmup 3%, weight decay 0.05, 2 epochs,
    max length 512). Invalid values raise ``QuadaError`` naming the fix. ``approximation`` is
    ``perturbation`` parsed (once, here)."""

    perturbation: str = field(
        default=DEFAULT_PERTURBATION,
        metadata={"help": "Approximation spec injected into the policy's forward (the MVA; any spec of `quada approx "
                  "list`, without layers=). Default: the paper-style Gaussian noise at the up site; replace it by the "
                  "MVA measured with `quada sweep`."},
    )
    tau: int = field(
        default=4,
        metadata={"help": "Perturb decoder layers 1..tau (indices 0..tau-1); the later layers run clean. Choose it "
                  "with `quada layers` (the smallest tau reaching most of the all-layer ASR)."},
    )
    perturb_layers: str = field(
        default="first-tau",
        metadata={"help": "Which layers run perturbed: 'first-tau' (QuadA), 'all' (ablation: every layer) or 'none' "
                  "(ablation: plain DPO).", "choices": list(PERTURB_LAYERS)},
    )
    reference: str = field(
        default="clean",
        metadata={"help": "How the reference runs: 'clean' (the paper: the unperturbed original) or 'perturbed' (under "
                  "the same approximation and noise draw as the policy's forward; its log-probabilities are then "
                  "computed at every step, not beforehand).", "choices": list(REFERENCES)},
    )
    preference_loss: str = field(
        default="dpo",
        metadata={"help": "The preference term: 'dpo' (the paper: DPO's sigmoid loss on summed log-ratios) or 'ipo' "
                  "(IPO's squared loss on per-token mean log-ratios, with beta as IPO's tau; Azar et al. 2023, eq. 17).",
                  "choices": list(PREFERENCE_LOSSES)},
    )
    reg_lambda: float = field(
        default=0.1,
        metadata={"help": "Weight lambda of the activation regularizer (minus lambda times the mean pairwise cosine "
                  "similarity of the harmful prompts' first-layer activations); 0 turns it off (ablation)."},
    )
    reg_pooling: str = field(
        default="last",
        metadata={"help": "How a prompt's first-layer activations become one vector: 'last' prompt token or 'mean' "
                  "over the prompt tokens.", "choices": list(POOLINGS)},
    )
    use_lora: bool = field(
        default=True,
        metadata={"help": "Train a LoRA adapter (PEFT) instead of every weight; the reference is then the model with "
                  "the adapter disabled. The paper fine-tunes fully; LoRA makes CPU training feasible."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha/r)."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the LoRA input. TRL's disable_dropout=True zeroes it unless that is turned off."},
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGETS),
        metadata={"help": "Module names that get a LoRA adapter (default: every attention and MLP projection)."},
    )
    # Overridden defaults of DPOConfig / TrainingArguments.
    learning_rate: float | None = field(
        default=None,
        metadata={"help": f"Peak learning rate; default {FULL_FINETUNE_LR:g} for full fine-tuning (the paper) and "
                  f"{LORA_LR:g} for LoRA."},
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (the paper: cosine)."})
    warmup_steps: float = field(
        default=0.03, metadata={"help": "Warmup: steps if >= 1, else a fraction of the training steps (the paper: 0.03)."}
    )
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (the paper: 0.05)."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Training epochs (the paper: 2)."})
    max_length: int | None = field(
        default=DEFAULT_MAX_LENGTH, metadata={"help": "Longest prompt+response in tokens; longer ones are cut (the paper: 512)."}
    )
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={"help": "Compute the clean reference log-probabilities once before training (saves a reference "
                  "forward per step); always off with reference='perturbed'."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision; by default on with a GPU and off on a CPU (where it also needs "
                  "use_cpu=True)."},
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of activation_checkpointing (recompute activations in the backward pass); "
                  "off by default. Not allowed with a perturbation: the recomputed forward would run without the "
                  "noise hooks, so the gradient would be that of another forward."},
    )

    def __post_init__(self):
        self.approximation = as_spec(self.perturbation)
        if any(part.layers is not None for part in self.approximation.parts()):
            raise QuadaError(
                f"the perturbation {self.perturbation!r} names its own layers; drop layers= and choose them with "
                "tau and perturb_layers"
            )
        self.perturbation = str(self.approximation)
        if not isinstance(self.tau, int) or self.tau < 1:
            raise QuadaError(f"tau must be a whole number of at least 1 (layers 1..tau are perturbed), got {self.tau}")
        if self.perturb_layers not in PERTURB_LAYERS:
            raise QuadaError(f"unknown perturb_layers {self.perturb_layers!r}; choose one of {', '.join(PERTURB_LAYERS)}")
        if self.reference not in REFERENCES:
            raise QuadaError(f"unknown reference {self.reference!r}; choose one of {', '.join(REFERENCES)}")
        if self.reference == "perturbed":
            if self.perturb_layers == "none":
                raise QuadaError("a perturbed reference needs a perturbation, and plain DPO has none; use reference "
                                 "'clean' or perturb the policy (perturb_layers 'first-tau' or 'all')")
            # The reference's noise is the draw of each step's policy forward: it cannot be computed beforehand.
            self.precompute_ref_log_probs = False
        if self.preference_loss not in PREFERENCE_LOSSES:
            raise QuadaError(f"unknown preference_loss {self.preference_loss!r}; choose one of {', '.join(PREFERENCE_LOSSES)}")
        if self.reg_pooling not in POOLINGS:
            raise QuadaError(f"unknown reg_pooling {self.reg_pooling!r}; choose one of {', '.join(POOLINGS)}")
        if self.use_lora:
            check_number("lora_r", self.lora_r, 1, whole=True)
            check_number("lora_alpha", self.lora_alpha, 0, above=True)
            if not 0 <= self.lora_dropout < 1:
                raise QuadaError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
            if not self.lora_target_modules:
                raise QuadaError("lora_target_modules is empty; name the projections to adapt, e.g. q_proj,v_proj")
        if self.learning_rate is None:
            self.learning_rate = LORA_LR if self.use_lora else FULL_FINETUNE_LR
        for name in POSITIVE_FIELDS:
            check_number(name, getattr(self, name), 0, above=True)
        for name in NON_NEGATIVE_FIELDS:
            check_number(name, getattr(self, name), 0)
        for name in COUNT_FIELDS:
            check_number(name, getattr(self, name), 1, whole=True)
        if self.reg_lambda > 0 and self.per_device_train_batch_size < 2:
            raise QuadaError(
                "the regularizer compares the harmful prompts within a batch, so it needs a batch of 2 pairs or more "
                f"(the paper: 4), got {self.per_device_train_batch_size}; raise --batch-size or set --reg-lambda 0"
            )
        if self.max_steps != -1:  # -1: the epochs decide
            check_number("max_steps", self.max_steps, 1, whole=True)
        check_seed(self.seed)
        if self.max_length is not None and self.max_length < 2:
            raise QuadaError(f"max_length must be at least 2 tokens, got {self.max_length}")
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and not self.fp16 and not self.use_cpu
        super().__post_init__()
        if self.preference_loss == "ipo" and self.loss_type != ["sigmoid"]:
            raise QuadaError(f"preference_loss 'ipo' replaces TRL's loss; leave loss_type at 'sigmoid' (got {self.loss_type})")
        if self.activation_checkpointing and self.perturb_layers != "none":
            raise QuadaError("activation (gradient) checkpointing cannot be used with a perturbation; turn it off (the default)")

    def lora_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.lora_target_modules),
            task_type="CAUSAL_LM",
        )


# --------------------------------------------------------------------------- trainer


@dataclass
class HarmfulPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator that also carries the boolean ``harmful`` column (False if absent)."""

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        batch[HARMFUL_COLUMN] = torch.tensor([bool(example.get(HARMFUL_COLUMN, False)) for example in examples])
        return batch


class QuadATrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with QuadA's loss; it overrides only what the loss needs (the loss, the
    reference log-probabilities and the columns kept, for the ``harmful`` flags).

    Logs, besides TRL's metrics (``rewards/margins`` among them, always DPO's summed rewards),
    ``dpo_loss`` (the DPO term) or, with ``preference_loss="ipo"``, ``ipo_loss`` and ``ipo/margins``
    (the mean length-normalised margin), and ``regularizer`` (the mean pairwise cosine similarity,
    before the weight lambda).
    """

    def __init__(self, model, ref_model=None, args: QuadAConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, peft_config=None, **kwargs):
        if not isinstance(args, QuadAConfig):
            raise QuadaError("QuadATrainer needs a QuadAConfig as args")
        if processing_class is None:
            raise QuadaError("QuadATrainer needs the model's tokenizer as processing_class")
        if train_dataset is not None and args.reg_lambda > 0 and HARMFUL_COLUMN not in train_dataset.column_names:
            raise QuadaError(
                f"the regularizer needs a boolean '{HARMFUL_COLUMN}' column marking harmful prompts in the training "
                "data (pairs made by `quada pairs` have it); add it or set reg_lambda=0"
            )
        if args.use_lora and peft_config is None and not is_peft_model(model):
            peft_config = args.lora_config()
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        if data_collator is None:
            data_collator = HarmfulPreferenceCollator(
                pad_token_id=processing_class.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        self._approximation = args.approximation
        self._draw_step, self._draws = -1, 0
        # Check tau against the model before TRL's setup (which may precompute reference log-probs).
        self._layers = perturbed_layers(args.perturb_layers, args.tau, len(resolve_decoder(model).layers))
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, peft_config=peft_config, **kwargs)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if HARMFUL_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, HARMFUL_COLUMN]

    def compute_ref_log_probs(self, model, inputs):
        """TRL's reference log-probabilities; the ``harmful`` flags are not a model input."""
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k != HARMFUL_COLUMN})

    def _forward_seed(self) -> int | None:
        """The noise seed of the next perturbed forward of the policy (None when nothing is perturbed)."""
        if not self._layers:
            return None
        step = self.state.global_step
        if step != self._draw_step:
            self._draw_step, self._draws = step, 0
        self._draws += 1
        return noise_seed(self.args.seed, step, self._draws - 1)

    def _perturbation(self, model, seed: int | None):
        """The approximation on ``model`` for one forward, drawn with ``seed``."""
        if seed is None:
            return contextlib.nullcontext()
        return apply(model, self._approximation, layers=self._layers, seed=seed, tokenizer=self.processing_class)

    @contextlib.contextmanager
    def _reference_from_batch(self):
        """Make TRL read the reference log-probabilities from the batch (computed just before)."""
        precomputed = self.precompute_ref_logps
        self.precompute_ref_logps = True
        try:
            yield
        finally:
            self.precompute_ref_logps = precomputed

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        harmful = inputs.pop(HARMFUL_COLUMN).bool()
        seed = self._forward_seed()
        reference = contextlib.nullcontext()
        if not self.precompute_ref_logps:
            # The reference runs here, before the policy's perturbation is installed (under its own copy of it,
            # with the same draw, for reference="perturbed"); TRL then reads it from the batch.
            ref_seed = seed if self.args.reference == "perturbed" else None
            ref_model = model if self.ref_model is None else self.ref_model
            with self._perturbation(ref_model, ref_seed):
                ref_chosen, ref_rejected = self.compute_ref_log_probs(ref_model, inputs)
            inputs |= {"ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
            reference = self._reference_from_batch()
        first_layer = resolve_decoder(model).layers[0].layer
        captured = {}
        # The policy forward's output, for the IPO loss (the first call only: TRL may run the model again for
        # return_outputs).
        policy_output = model.register_forward_hook(lambda _m, _a, output: captured.setdefault("policy", output))
        try:
            with reference, self._perturbation(model, seed), capturing({"first": (first_layer, "output")}, captured.__setitem__):
                result = super()._compute_loss(model, inputs, return_outputs)
        finally:
            policy_output.remove()
        if self.args.preference_loss == "ipo":
            preference = self._ipo_loss(captured["policy"], inputs, mode)
            self._metrics[mode]["ipo_loss"].append(preference.item())
        else:
            preference = result[0] if return_outputs else result
            self._metrics[mode]["dpo_loss"].append(preference.item())

        pairs = harmful.shape[0]  # rows 0..pairs-1 are prompt+chosen, one per pair
        prompt_mask = inputs["attention_mask"][:pairs].bool() & ~inputs["completion_mask"][:pairs].bool()
        features = pool_prompt_activations(captured["first"][:pairs][harmful], prompt_mask[harmful], self.args.reg_pooling)
        similarity = pairwise_cosine_regularizer(features.float())
        self._metrics[mode]["regularizer"].append(similarity.item())
        loss = preference - self.args.reg_lambda * similarity if self.args.reg_lambda else preference
        return (loss, result[1]) if return_outputs else loss

    def _ipo_loss(self, output, inputs, mode: str) -> torch.Tensor:
        """:func:`length_normalised_ipo_loss` of the batch, from the policy forward's per-token
        log-probabilities (as TRL reads them) and the reference's summed ones in ``inputs``."""
        scored = inputs["completion_mask"][:, 1:]  # the tokens whose log-probability is scored
        per_token = output.log_probs[:, -scored.shape[1]:]
        logps = (per_token * scored).sum(dim=1)
        chosen_tokens, rejected_tokens = scored.sum(dim=1).clamp(min=1).to(logps.dtype).chunk(2)
        chosen_logps, rejected_logps = logps.chunk(2)
        chosen = chosen_logps - inputs["ref_chosen_logps"].to(logps.device)
        rejected = rejected_logps - inputs["ref_rejected_logps"].to(logps.device)
        margins = (chosen / chosen_tokens - rejected / rejected_tokens).detach()
        self._metrics[mode]["ipo/margins"].append(margins.mean().item())
        return length_normalised_ipo_loss(chosen, rejected, chosen_tokens, rejected_tokens, self.args.beta).mean()
