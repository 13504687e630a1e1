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
