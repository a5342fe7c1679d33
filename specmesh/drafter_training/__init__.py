"""`specmesh train-drafter`: distil a small drafter (with a confidence head) for a verifier.

One concept per module:
- data.py      prompt sets and the verifier's own sampled generations (the training data)
- model.py     the drafter (a small LlamaForCausalLM sharing the verifier's embedding/LM head)
               and the confidence head
- losses.py    distillation (KL + total variation) and the confidence head's soft-label loss
- train.py     the time-bounded training loop
- evaluate.py  held-out agreement, acceptance by position, calibration; JSON + plot
- export.py    the on-disk format: write a drafter directory and load it back
"""
