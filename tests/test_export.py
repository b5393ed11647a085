"""Export: ONNX that onnxruntime runs like torch, at any batch size, in the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
import yaml

from helpers import REPO, tiny_split, write_prepared
from stages.common import run_cli, save_torch
from stages.data import to_device
from stages.export import export, main, metrics, onnx_log_probs, to_onnx
from stages.model import Net, checkpoint, predict

MEAN, STD = 0.2, 0.35  # write_prepared's stats.json


def trained_looking_net(seed: int) -> Net:
    """Net with random weights, its BatchNorm statistics measured on tiny digits and
    noise, and a larger last layer: outputs that differ from digit to digit and are
    far from uniform, as a trained model's are."""
    torch.manual_seed(seed)
    model = Net(dropout=0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the batches below
            module.reset_running_stats()
    with torch.no_grad():
        model(digits(tiny_split(64, seed=2)["images"]))
        model(torch.randn(64, 1, 28, 28))
        model.features[-1].weight.mul_(10)
    return model.eval()


def digits(images: torch.Tensor) -> torch.Tensor:
    """uint8 IMAGES normalised as the stage normalises them."""
    return to_device(images, None, MEAN, STD, torch.device("cpu")).x


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, images, ONNX path, parity figures) from one export of a small Net."""
    model = trained_looking_net(seed=0)
    images = tiny_split(64, seed=1)["images"]
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    return model, images, path, export(model, images, MEAN, STD, path)


def test_onnxruntime_matches_torch_on_every_digit(exported):
    model, images, path, figures = exported
    assert path.is_file()
    assert figures["digits"] == 64 and figures["argmax_mismatches"] == 0
    assert figures["max_abs_diff"] <= 1e-4
    # checked again here, on outputs that differ from digit to digit
    x = digits(images)
    got = onnx_log_probs(path.read_bytes(), x)
    assert len(set(got.argmax(1).tolist())) >= 3
    np.testing.assert_allclose(got, predict(model, x, 64).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("batch", [1, 7])
def test_batch_dimension_is_dynamic(exported, batch):
    model, _, path, _ = exported
    graph = onnx.load(path).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic, not a number
    x = torch.randn(batch, 1, 28, 28)
    got = onnx_log_probs(path.read_bytes(), x)
    assert got.shape == (batch, 10)
    np.testing.assert_allclose(got, predict(model, x, batch).numpy(), atol=1e-4, rtol=0)


def test_same_checkpoint_gives_the_same_bytes(exported):
    model, _, path, _ = exported
    again = to_onnx(trained_looking_net(seed=0), MEAN, STD)
    assert again == path.read_bytes()
    # nothing that names this checkout or this build
    assert str(REPO).encode() not in again and b"site-packages" not in again
    proto = onnx.load_from_string(again)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta == {"normalisation_mean": repr(MEAN), "normalisation_std": repr(STD)}
    # the weights go in bit for bit (the exporter shares equal ones, such as BatchNorm's
    # initial ones and zeros), so no CPU's arithmetic enters the file
    weights = model.state_dict()
    floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert len(floats) >= 20 and {t.name for t in floats} <= set(weights)
    for t in floats:
        assert onnx.numpy_helper.to_array(t).tobytes() == weights[t.name].numpy().tobytes()


def test_parity_failure_is_one_line_and_leaves_no_onnx(exported, tmp_path, monkeypatch, capsys):
    """The checkpoint holds another model than the ONNX bytes (a stand-in for a broken
    exporter): the stage fails, and removes an older model.onnx."""
    _, _, path, _ = exported
    data = write_prepared(tmp_path / "prepared", n_train=8, n_test=64)
    save_torch(tmp_path / "model.pt", checkpoint(trained_looking_net(seed=1), {"dropout": 0.0}))
    onnx_path, metrics_path = tmp_path / "model.onnx", tmp_path / "export.json"
    onnx_path.write_bytes(b"an older export")
    monkeypatch.setattr("stages.export.to_onnx", lambda *args: path.read_bytes())
    # in this process torch has computed already: too late to pin the CPU's kernels
    monkeypatch.setattr("stages.export.apply_runtime", lambda runtime: None)
    monkeypatch.setattr(sys, "argv", ["export", "--model", str(tmp_path / "model.pt"),
                                      "--data", str(data), "--onnx", str(onnx_path),
                                      "--metrics", str(metrics_path)])
    with pytest.raises(SystemExit) as exit:
        run_cli(main)
    assert exit.value.code == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("error: ONNX export does not match torch on 64 test digits: ")
    assert not onnx_path.exists() and not metrics_path.exists()
    assert not list(tmp_path.glob(".model.onnx.*"))  # no temporary file either


def test_metrics_hold_no_raw_float(exported):
    figures = exported[3]
    recorded = metrics(figures)
    assert 0 < figures["max_abs_diff"] <= 1e-4
    assert recorded == {"digits": 64, "argmax_mismatches": 0, "tolerance": 1e-4,
                        "within_tolerance": True}


def test_export_depends_on_the_runtime_section_only():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["export"]
    assert stage["params"] == ["runtime"]


def git(*args: str, cwd) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside DVC
def test_model_is_an_artifact_that_dvc_artifacts_get_fetches(tmp_path, monkeypatch):
    from dvc.repo import Repo
    from dvc.repo.artifacts import Artifacts

    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    with Repo(str(REPO)) as repo:  # dvc.yaml as DVC's own loader reads it
        artifact = repo.artifacts.read()["dvc.yaml"]["mnist-cnn"]
    assert (artifact.path, artifact.type) == ("models/model.pt", "model")
    assert artifact.desc and artifact.labels
    outs = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["outs"]
    assert artifact.path in outs  # the pipeline makes it, and DVC caches it

    # a project holding the same declaration, a checkpoint and a version tag
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    artifacts = yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"artifacts": artifacts}))
    save_torch(project / "models/model.pt", checkpoint(Net(dropout=0.0), {"dropout": 0.0}))
    git("init", "-q", cwd=project)
    Repo.init(str(project)).close()
    with Repo(str(project)) as repo:
        repo.add(str(project / "models/model.pt"))
    git("add", "-A", cwd=project)
    git("commit", "-qm", "model", cwd=project)
    git("tag", "-a", "mnist-cnn@v1.0.0", "-m", "mnist-cnn v1.0.0", cwd=project)
    Artifacts.get(str(project), "mnist-cnn", out=str(tmp_path / "fetched.pt"))
    assert (tmp_path / "fetched.pt").read_bytes() == (project / "models/model.pt").read_bytes()
