"""lm-gym's tests: a package, so that tests/lm_gym/ and tests/algorithms/ are tests.lm_gym and
tests.algorithms and never shadow the packages they test (docs/testing.md)."""
