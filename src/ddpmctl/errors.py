"""User-facing errors. The CLI turns each into one stderr line and an exit code.

Library code raises these instead of printing; the message is written for the user:
it names the thing that is wrong, the value, and what would be accepted.
"""

from __future__ import annotations


class DdpmctlError(Exception):
    """Base class. ``exit_code`` 1 = runtime failure, 2 = usage error."""

    exit_code = 1


class UsageError(DdpmctlError):
    """The user asked for something invalid (bad value, missing path, unknown name)."""

    exit_code = 2


class SpecError(UsageError):
    """A run spec field is invalid."""


class SymlinkError(UsageError):
    """A symbolic link stands where ddpmctl keeps a file of its own (ddpmctl.safefile refuses it)."""


class DataError(DdpmctlError):
    """A dataset could not be found, downloaded, verified or decoded."""


class DataNotFoundError(UsageError):
    """A named dataset is not prepared locally and cannot be fetched now."""


class DeviceError(UsageError):
    """The requested device is not available on this machine."""


class CheckpointError(DdpmctlError):
    """A checkpoint is missing, incomplete or fails verification."""


class RunDirError(UsageError):
    """A run directory is missing, foreign or unusable."""


class NonFiniteError(DdpmctlError):
    """A tensor went NaN/Inf (training diverged or sampling blew up)."""


class NetworkError(DdpmctlError):
    """A download or upload failed."""
