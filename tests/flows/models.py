"""User-defined models for the torch trainer, as a user would reference them: 'module:factory'."""

from torch import nn


class _Exploding(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(3, num_classes)

    def forward(self, images):
        raise RuntimeError("the model exploded on purpose (a bug in user code)")


def exploding(num_classes: int) -> nn.Module:
    return _Exploding(num_classes)


GIL_HOLD_S = 80  # longer than the zombie window (60 s) and than two of Prefect's 30 s heartbeat periods


class _GilHog(nn.Module):
    """Its first forward pass holds the interpreter lock in one C call for GIL_HOLD_S, as a long native call that
    never releases it would: no other thread of the training process (Prefect's heartbeat included) runs meanwhile."""

    held = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(3, num_classes)

    def forward(self, images):
        if not _GilHog.held:
            import ctypes

            _GilHog.held = True
            ctypes.PyDLL(None).sleep(GIL_HOLD_S)  # PyDLL: called with the GIL held
        return self.head(images.mean(dim=(2, 3)))


def gil_hog(num_classes: int) -> nn.Module:
    return _GilHog(num_classes)


class _HangOnce(nn.Module):
    """Hangs in its first forward pass without holding the interpreter lock (a hung data loader, a deadlock),
    for as many seconds as the file named by TRAINYARD_TEST_HANG_MARK says; the process that takes that file
    (deletes it) is the only one that hangs, so the next attempt of the same request trains."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(3, num_classes)
        self.checked = False

    def forward(self, images):
        if not self.checked:
            import os
            import time
            from pathlib import Path

            self.checked = True
            mark = Path(os.environ.get("TRAINYARD_TEST_HANG_MARK", "/nonexistent"))
            try:
                seconds = float(mark.read_text())
                mark.unlink()
            except (OSError, ValueError):
                seconds = 0.0
            time.sleep(seconds)
        return self.head(images.mean(dim=(2, 3)))


def hang_once(num_classes: int) -> nn.Module:
    return _HangOnce(num_classes)
