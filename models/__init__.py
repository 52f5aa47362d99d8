"""The served model: the registered MLflow pyfunc (``models.pyfunc``, ``models.serving``), its
routing of a client's rows to personal, group or global heads (``models.personalized``) and
the scoring of registered versions (``models.scoring``).

The torch modules it is built from are part of the core, :mod:`fedmtl.nn`, re-exported here.
``models.pyfunc`` imports MLflow and is kept out of this namespace, so importing ``models``
never imports MLflow."""

from fedmtl.nn import MLPBase, MultiTaskModel, SmallCNNBase, build_base, build_head, build_model

__all__ = ["MLPBase", "SmallCNNBase", "build_base", "build_head", "MultiTaskModel", "build_model"]
