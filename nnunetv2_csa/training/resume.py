"""``nnUNetv2_train --c`` with a damaged checkpoint names the file.

nnU-Net's ``load_checkpoint`` hands a truncated ``checkpoint_latest.pth`` straight to
``torch.load``, which fails with a zip error that names no file. The trainers of this
package check the file first (``nnunetv2_csa.checkpoints.check_checkpoint_readable``)."""
from __future__ import annotations

from typing import Union

from nnunetv2_csa.checkpoints import check_checkpoint_readable


class ReadableCheckpointMixin:
    """Put before an nnU-Net trainer class in the bases."""

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        if isinstance(filename_or_checkpoint, str):
            check_checkpoint_readable(filename_or_checkpoint)
        super().load_checkpoint(filename_or_checkpoint)
