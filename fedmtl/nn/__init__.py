"""Torch modules: shared bases, task heads and the multi-task model they make.

Part of the core (the federation builds its model from them); the top-level ``models/``
package re-exports them and holds the served model (the registered pyfunc and its routing).
"""

from fedmtl.nn.bases import MLPBase, SmallCNNBase, build_base
from fedmtl.nn.heads import build_head
from fedmtl.nn.multitask import MultiTaskModel, build_model

__all__ = ["MLPBase", "SmallCNNBase", "build_base", "build_head", "MultiTaskModel", "build_model"]
