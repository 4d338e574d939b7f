"""No raw tracebacks (issue 21, item 5): a damaged segmenter.pt given to `wsssrec predict` is named with exit
2; `mlflow models serve` answers bad requests (a non-image, a wrong column, out-of-range pixels, a bare
`instances` list) with HTTP 400, a message that names the problem, and no server stack trace."""
import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _jpeg(value: int = 120, size=(20, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def tiny_segmenter(root: Path) -> Path:
    """An untrained segmenter.pt (64 px, one class, no gate): enough to exercise the input paths."""
    from trainer.config import load_config
    from trainer.effnet import EfficientNetLite0
    from trainer.models import Segmenter
    from trainer.weights import save_segmenter

    cfg = load_config(str(REPO / "configs" / "toy_birds.yaml"), ["data.image_size=64", "eval.gate_threshold=0"])
    torch.manual_seed(0)
    path = root / "segmenter.pt"
    save_segmenter(Segmenter(cfg.model, 1, trunk=EfficientNetLite0(num_classes=1)), cfg, ["bird"], path)
    return path


def _predict(root: Path, model: Path, images: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "predict", "--model", str(model), "--images", str(images),
                           "--out", str(root / "out")], cwd=root, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_segmenter_file_is_named_with_exit_2(tmp_path, damage):
    from trainer.weights import WeightsError, read_segmenter_file

    good = tiny_segmenter(tmp_path)
    bad = tmp_path / "bad" / "segmenter.pt"
    bad.parent.mkdir()
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 3] if damage == "truncated" else os.urandom(4096))
    with pytest.raises(WeightsError, match=f"{bad} is not a readable segmenter.pt"):
        read_segmenter_file(bad)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(_jpeg())
    proc = _predict(tmp_path, bad, images)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"wsssrec: error: {bad} is not a readable segmenter.pt" in proc.stderr
    assert "Traceback" not in proc.stderr and "weights_only=False" not in proc.stderr
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served_model(tmp_path):
    """`mlflow models serve` of a tiny model folder on 127.0.0.1; stopped by its process group's id."""
    import signal

    from trainer.config import config_from_dict
    from trainer.pyfunc import save_model
    from trainer.weights import read_segmenter_file

    weights = tiny_segmenter(tmp_path)
    cfg = config_from_dict(torch.load(weights, weights_only=True)["config"], strict=False)
    assert read_segmenter_file(weights).classes == ["bird"]
    save_model(str(tmp_path / "model"), kind="segmenter", weights=weights, cfg=cfg, classes=["bird"])
    port = _free_port()
    log = (tmp_path / "serve.log").open("wb")
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(tmp_path / "model"),
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(url + "/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        yield url + "/invocations"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()


@pytest.mark.slow
def test_rest_errors_are_400_with_a_message_and_no_stack_trace(served_model):
    jpg = base64.b64encode(_jpeg()).decode()
    cases = [
        ({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"hello world").decode()]]}},
         "row 0: not a readable JPEG/PNG image"),
        ({"dataframe_split": {"columns": ["foo"], "data": [[jpg]]}}, "input has columns ['foo']; expected 'image'"),
        ({"dataframe_split": {"columns": ["pixels"], "data": [[[[[300, 0, 0]], [[5, 6, 7]]]]]}},
         "row 0: integer pixels must be 0-255, got values from 0 to 300"),
        ({"instances": [jpg]}, "a bare list in `instances` or `inputs` has no column names"),
    ]
    for payload, message in cases:
        response = requests.post(served_model, json=payload, timeout=120)
        body = response.json()
        assert response.status_code == 400, response.text[-2000:]
        assert body["error_code"] == "INVALID_PARAMETER_VALUE" and message in body["message"], body["message"][-600:]
        assert "stack_trace" not in body and "Traceback" not in response.text and "site-packages" not in response.text
    # the good forms still answer: dataframe_split, `instances` records, `inputs` columns
    for payload in ({"dataframe_split": {"columns": ["image"], "data": [[jpg]]}},
                    {"instances": [{"image": jpg}]}, {"inputs": {"image": [jpg]}},
                    {"dataframe_split": {"columns": ["pixels"], "data": [[[[[30, 0, 0], [1, 2, 3]]]]]}}):
        response = requests.post(served_model, json=payload, timeout=120)
        assert response.status_code == 200, response.text[-2000:]
        mask = np.asarray(response.json()["predictions"][0]["mask"])
        assert mask.shape in ((20, 30), (1, 2))
