"""Jailbreak attacks against a model as served, approximation active (`quada attack`, docs/attack.md).

One module per attack (``gcg``, ``transfer``, ``autodan``, ``dra``, ``templates``, ``many_shot``,
``past_tense``), each citing its source; the offline material in ``sources``, the target loss in
``loss``, the stored prompts and GCG steps in ``records``, the run in ``run``, its report in ``report``.
"""
