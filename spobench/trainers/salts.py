"""Seed salts: the constant that names each random stream of a run in ``derive_seed(seed, ..., SALT)``.

A trainer's per-prompt rollout generators are ``derive_seed(seed, epoch, round, prompt)``; any other
stream drawn for the same (epoch, round, prompt) adds its own salt, or it would replay the rollout's
numbers (the trained-step choice would then be a function of the sampling noise). One list, so that
two streams can be seen not to share a salt. The values are part of every recorded result: changing
one changes the numbers of every run that draws from that stream.
"""

LORA_INIT = 0x10A  # the LoRA's initial weights
EPOCH_ORDER = 0x9E0  # each epoch's prompt order; Diffusion-DPO's pair order (``BatchOrder`` seed)
SHARE = 0x5A1  # the shuffle that deals a round's items to the processes
TRAINED_STEPS = 0x75  # which steps of a DDPO / D3PO trajectory train (``timestep_fraction``)
DDPO_SAMPLE = 0xDD  # a DDPO trajectory's noise, one per (prompt, image)
D3PO_PAIR = 0xD3  # a D3PO pair's shared x_T and each side's noise
DPO_VAE = 0x7AE  # the VAE posterior samples of a round's Diffusion-DPO pairs
DPO_PAIR = 0xDB0  # a Diffusion-DPO pair's t, noise, flips and caption dropout
FLOW_GRPO_SAMPLE = 0xF6  # a Flow-GRPO image's x_1 and SDE noise, one per (prompt, image in its group)
