"""Tests of lm_gym/, the environment side."""
