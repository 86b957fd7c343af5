"""Tests of algorithms/common/: the on-policy core and the trainer skeleton."""
