# Imported by Python at start-up when tests/faults is on PYTHONPATH: installs tests/nan_injection.py's
# NaN hook in subprocesses (torchrun workers) from DDPMCTL_TEST_NAN_CALLS. Nothing happens without it.
import nan_injection

nan_injection.install_from_env()
