"""MLflow "models from code" entry point: logged with the model, run when it is loaded."""

from mlflow.models import set_model

from models.pyfunc import PersonalizedModel

set_model(PersonalizedModel())
