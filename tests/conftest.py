"""tests/: the test device, the Triton interpreter switch, markers and the launch-device check live in the
repository's root conftest.py (shared with bench/)."""
