"""Torch modules: shared bases, task heads, the multi-task model (and, in ``models.pyfunc``,
the MLflow wrapper, kept out of this namespace so that importing models never imports MLflow)."""

from models.bases import MLPBase, SmallCNNBase, build_base
from models.heads import build_head
from models.multitask import MultiTaskModel, build_model

__all__ = ["MLPBase", "SmallCNNBase", "build_base", "build_head", "MultiTaskModel", "build_model"]
