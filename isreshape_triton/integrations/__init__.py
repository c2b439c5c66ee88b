"""Drop-in adapters for RL trainers.

Each module imports its trainer lazily (importing this package imports none of them):

``isreshape_triton.integrations.verl``      every family as a verl ``register_policy_loss`` entry
``isreshape_triton.integrations.trl``       ``IRTGRPOTrainer``: TRL's GRPO loss through the op
``isreshape_triton.integrations.openrlhf``  ``PolicyLoss`` with OpenRLHF's ``forward`` contract
"""
