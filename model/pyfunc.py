"""The exported encoder as an MLflow pyfunc model (MLflow's "models from code": this file is copied into
every logged model and run by `mlflow.pyfunc.load_model`, so it imports only mlflow, numpy, torch and
timm, never this project).

`predict` maps a float32 image batch (N, 3, H, W), normalised as the model's metadata says (mean,
std, input size), to the encoder's (N, D) features: the cls token after the final norm.
`model.export.save_mlflow_model` writes the model around an export folder.
"""

import mlflow
import numpy as np
import timm
import torch


class Encoder(mlflow.pyfunc.PythonModel):
    """The timm encoder of the model's `encoder` artifact (an export folder: config.json and weights)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.model = timm.create_model(f"local-dir:{context.artifacts['encoder']}", pretrained=True).eval()

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: np.ndarray,
                params: dict | None = None) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()


mlflow.models.set_model(Encoder())
