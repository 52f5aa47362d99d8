"""The MLflow ``pyfunc`` wrapper around :class:`models.personalized.PersonalizedPredictor`.

Input: a ``client_id`` column plus the feature columns; optionally the tasks' label columns.
Output: one column per task (the predicted label or value) and ``head`` (personal, group,
cold-start or global: which heads answered). A client id the model does not know is answered
by the global heads, unless some of its rows carry labels: then those rows are its support set
and all its rows are answered by a cold-start head (fedmtl/lifecycle/coldstart.py).
"""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd
import torch

from models.personalized import PersonalizedBundle, PersonalizedPredictor

BUNDLE_ARTIFACT = "bundle"


class PersonalizedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        raw = torch.load(context.artifacts[BUNDLE_ARTIFACT], weights_only=True)
        self.predictor = PersonalizedPredictor(PersonalizedBundle.from_dict(raw))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.predictor.predict(model_input)
