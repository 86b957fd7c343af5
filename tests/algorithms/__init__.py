"""Tests of algorithms/: the policy, the algorithms, SFT, the reward model, the pipeline,
the CLI."""
