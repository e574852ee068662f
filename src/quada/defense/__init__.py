"""QuadA, the defense of the source paper (PAPER.md section 5): approximation-aware DPO.

- :mod:`quada.defense.quada`: ``QuadAConfig`` / ``QuadATrainer`` on TRL's DPO and the pure loss pieces;
- :mod:`quada.defense.pairs`: preference pairs (PKU-SafeRLHF, or made offline by the model itself)
  and the train/held-out split of the prompts;
- :mod:`quada.defense.align`: train, save the aligned model with its card, evaluate before/after.
"""
