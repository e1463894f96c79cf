"""Errors that mean "the input was wrong", which the CLI reports in one line.

Set LLAMA_OMNI_DEBUG=1 to get the full traceback instead.
"""

from __future__ import annotations

import os

from llama_omni.packaged import PackagedAssetError


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, corrupt or does not match its config."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ()
    if os.environ.get("LLAMA_OMNI_DEBUG")
    else (FileNotFoundError, IsADirectoryError, ValueError, PackagedAssetError)
)
