"""MLflow "models from code" entry point: logged with the model, run when it is loaded.

A request the model cannot answer (a missing feature column, a value that is not a number, too
many cold starts: the ``ValueError`` of :class:`~models.personalized.PersonalizedPredictor`)
is answered HTTP 400 whose message is the model's own sentence. MLflow's scoring server would
otherwise answer "Encountered an unexpected error ..." with the sentence at the end of a stack
trace (a plain exception), or prefix the message with a dump of the whole request (an
``MlflowException``: ``Failed to predict data '<the request>'``); :class:`RequestError` keeps
its sentence as the message.
"""

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from models.pyfunc import PersonalizedModel


class RequestError(MlflowException, ValueError):
    """The model's answer to a request it cannot serve: HTTP 400, the sentence first."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self.__dict__["_sentence"]

    @message.setter
    def message(
        self, value: str
    ) -> None:  # the first is the sentence; the server's prefix is dropped
        self.__dict__.setdefault("_sentence", value)


class ServedModel(PersonalizedModel):
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            return super().predict(context, model_input, params)
        except RequestError:
            raise
        except ValueError as exc:
            raise RequestError(str(exc)) from None


set_model(ServedModel())
