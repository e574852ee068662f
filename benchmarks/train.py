"""Training throughput of QuadA against TRL's plain DPOTrainer, as a ratio measured in one run.

Both trainers get a fresh copy of the same model, the same pairs, batch size, LoRA adapter and
precomputed reference log-probabilities; each trains one epoch over the pairs after a one-step
warm-up, and only ``train()`` is timed (not the reference precomputation). QuadA's extra work is
the perturbation hooks (fresh noise every forward) and the first-layer regularizer.
Target: QuadA at most 1.5x slower.

    python benchmarks/train.py --model qwen2.5-coder-0.5b-instruct --pairs 16
    python benchmarks/train.py --tiny                      # a quick check on a tiny random model
"""

from __future__ import annotations

import copy
import tempfile
import time

import torch
import typer
from trl import DPOConfig, DPOTrainer

from quada.data import load_benchmark
from quada.defense.align import preference_rows
from quada.defense.pairs import PreferencePair, load_pairs, written_refusal
from quada.defense.quada import QuadAConfig, QuadATrainer

# A neutral stand-in for a compliant answer: as long as a real one, with no harmful content.
PLACEHOLDER_ANSWER = "Sure. " + " ".join(f"Step {i}: prepare the next part carefully and check the result." for i in range(1, 7))


def stand_in_pairs(n: int) -> list[PreferencePair]:
    """``n`` pairs alternating the bundled harmful and benign prompts, with fixed responses."""
    harmful, benign = load_benchmark("quada-harmful"), load_benchmark("quada-benign")
    pairs = []
    for i in range(n):
        prompt = (harmful if i % 2 == 0 else benign)[i // 2]
        refusal = written_refusal(prompt.id)
        chosen, rejected = (refusal, PLACEHOLDER_ANSWER) if i % 2 == 0 else (PLACEHOLDER_ANSWER, refusal)
        pairs.append(PreferencePair(prompt.id, prompt.text, chosen, rejected, i % 2 == 0, "benchmark"))
    return pairs


def main(
    model: str = typer.Option("qwen2.5-coder-0.5b-instruct", help="Model to train (built-in name, folder or file)."),
    tiny: bool = typer.Option(False, "--tiny", help="Use a tiny random Qwen2 model instead (quick check; its ratio overstates the overhead)."),
    pairs: int = typer.Option(16, "--pairs", help="Pairs trained on (one epoch)."),
    pairs_file: str | None = typer.Option(None, help="Pairs from `quada pairs` instead of the stand-in pairs (the first --pairs of them)."),
    batch_size: int = typer.Option(4, help="Pairs per step."),
    tau: int = typer.Option(4, help="QuadA's perturbed layers 1..tau."),
    perturbation: str = typer.Option("noise:site=up,dist=gaussian,std=0.075", help="QuadA's perturbation."),
) -> None:
    from datasets import Dataset

    from quada.models import load
    from quada.testing import tiny_model

    if tiny:
        base, tokenizer = tiny_model("qwen2", layers=4, hidden=256)
        label = "tiny-qwen2"
    else:
        base, tokenizer = load(model, dtype=torch.float32)
        label = model
    chosen = load_pairs(pairs_file)[:pairs] if pairs_file else stand_in_pairs(pairs)
    dataset = Dataset.from_list(preference_rows(chosen, "paper"))
    common = dict(per_device_train_batch_size=batch_size, num_train_epochs=1, report_to="none", save_strategy="no",
                  logging_steps=10_000, dataloader_pin_memory=False, disable_tqdm=True, bf16=False,
                  precompute_ref_log_probs=True, max_length=512, seed=0)
    lora = QuadAConfig(output_dir=tempfile.mkdtemp()).lora_config()

    def plain(out):
        return DPOTrainer(copy.deepcopy(base), args=DPOConfig(output_dir=out, activation_checkpointing=False, **common),
                          train_dataset=dataset, processing_class=tokenizer, peft_config=lora)

    def quada(out):
        return QuadATrainer(copy.deepcopy(base), args=QuadAConfig(output_dir=out, perturbation=perturbation, tau=tau,
                                                                  **common),
                            train_dataset=dataset, processing_class=tokenizer)

    seconds = {}
    for name, build in (("TRL DPOTrainer", plain), ("QuadATrainer", quada)):
        with tempfile.TemporaryDirectory() as out:
            trainer = build(out)
            trainer.args.max_steps = 1  # warm-up step, untimed
            trainer.train()
            trainer = build(out)
            start = time.perf_counter()
            trainer.train()
            seconds[name] = time.perf_counter() - start
    print(f"model {label}, {torch.get_num_threads()} threads, {len(chosen)} pairs, batch {batch_size}, LoRA, "
          f"tau {tau}, {perturbation}")
    for name, value in seconds.items():
        print(f"{name:16s} {len(chosen) / value:8.3f} pairs/s")
    ratio = seconds["QuadATrainer"] / seconds["TRL DPOTrainer"]
    print(f"QuadA / plain DPO time: {ratio:.2f}x  {'ok' if ratio <= 1.5 else 'SLOWER THAN TARGET (1.5x)'}")


if __name__ == "__main__":
    typer.run(main)
