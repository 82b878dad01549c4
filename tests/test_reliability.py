"""Scale and reliability: two-process runs, kill-and-resume, bad input, NaN losses, unwritable outputs."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL, tiny_demo_overrides
from wsseg.cli.main import main
from wsseg.config_schema import BackboneConfig, ClassifierConfig, DatasetConfig, RecipeConfig
from wsseg.data import create_dataset
from wsseg.data.io import read_binary_mask
from wsseg.deploy.onnx_export import read_metadata
from wsseg.errors import ConfigError, DataError, WssegError
from wsseg.models.segmenter import load_segmenter
from wsseg.runner import prepare_run_dir
from wsseg.training import NonFiniteLoss

ROOT = Path(__file__).resolve().parents[1]


def _wsseg(*args, env=None):
    return [sys.executable, "-m", "wsseg", *args]


# ----------------------------------------------------------------------------- distributed

def _ddp_worker(rank, world, port, out, task):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    from wsseg import distributed as dist

    dist.init_from_env("cpu")  # gloo, also on a machine with a GPU (one GPU cannot serve two NCCL ranks)
    try:
        task(Path(out))
    finally:
        torch.distributed.destroy_process_group()


def _train_task(out: Path):
    from wsseg.stages.classifier import train_classifier

    config = ClassifierConfig(train=[DatasetConfig("synthetic", None, "train", options={"n": 32, "size": 32})],
                              image_size=32, epochs=2, batch_size=8, lr=1e-3, amp=False)
    result = train_classifier(config, BackboneConfig(TINY_MODEL, "none"), out, torch.device("cpu"), seed=0)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "loss.json").write_text(json.dumps(result.metrics["final_loss"]))


def _maps_task(out: Path):
    from wsseg import distributed as dist
    from wsseg.cams import create_map_method
    from wsseg.models.classifier import build_classifier
    from wsseg.stages.maps import write_maps

    torch.manual_seed(0)
    model = build_classifier(TINY_MODEL, "none", 2).eval()
    dataset = create_dataset(DatasetConfig("synthetic", None, "val", options={"n": 7, "size": 32}))
    with create_map_method("gradcam", model=model) as method:
        write_maps(method, dataset, out / "maps", 32, (0.5,) * 3, (0.5,) * 3, np.ones(7, int), "cpu", batch_size=2,
                   indices=dist.shard(range(len(dataset))))


def _spawn(task, out, world=2):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(world, port, str(out), task), nprocs=world, join=True)


def test_two_gloo_processes_shard_maps_exactly_like_one(tmp_path):
    _spawn(_maps_task, tmp_path / "two")
    (tmp_path / "one").mkdir()
    _maps_task(tmp_path / "one")
    one = sorted(p.name for p in (tmp_path / "one" / "maps").glob("*.npy"))
    two = sorted(p.name for p in (tmp_path / "two" / "maps").glob("*.npy"))
    assert one == two and len(one) == 7
    for name in one:
        np.testing.assert_allclose(np.load(tmp_path / "one" / "maps" / name),
                                   np.load(tmp_path / "two" / "maps" / name), atol=1e-3)


def test_two_gloo_processes_train_like_one(tmp_path):
    (tmp_path / "one").mkdir()
    torch.manual_seed(0)
    _train_task(tmp_path / "one")
    _spawn(_train_task, tmp_path / "two")
    single = json.loads((tmp_path / "one" / "loss.json").read_text())
    double = json.loads((tmp_path / "two" / "loss.json").read_text())
    assert np.isfinite(double) and abs(single - double) < 0.25 * max(single, 0.1), (single, double)
    assert (tmp_path / "two" / "classifier.pth").is_file()


def test_the_process_group_follows_the_runs_device_not_the_machine(monkeypatch):
    from wsseg import distributed as dist

    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: backends.append(f"cuda:{index}"))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **_: backends.append(backend))
    assert dist.init_from_env("cpu") and backends == ["gloo"]  # CPU processes: gloo, no GPU taken
    with pytest.raises(WssegError, match=r"LOCAL_RANK 1: this machine has 1 CUDA device.*--nproc_per_node 1"):
        dist.init_from_env("auto")  # auto means CUDA here, and a second rank has no GPU of its own
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dist.init_from_env("cuda") and backends == ["gloo", "cuda:1", "nccl"]


# ----------------------------------------------------------------------------- resume

def _resume_overrides():
    """Small, but with a classifier long enough to be killed in the middle of it."""
    return [o for o in tiny_demo_overrides(("gradcam",)) if not o.startswith("classifier.epochs")] + [
        "classifier.epochs=5", "classifier.train.0.options.n=64", "seed=3", "segment.masks=gradcam",
        "pseudo_masks.variants=[]", "export=null"]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_wsseg("recipe", "run", "demo", "--out", str(reference), *_resume_overrides()), check=True,
                   env=env, capture_output=True, cwd=ROOT)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_wsseg("recipe", "run", "demo", "--out", str(killed), *_resume_overrides()), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 600  # generous: a loaded CI machine is slow, and the loop exits as soon as it can
    states = []
    while time.time() < deadline and proc.poll() is None:
        states = list((killed / "checkpoints").glob("classifier.*.state.pth"))
        if states and torch.load(states[0], weights_only=False)["epoch"] >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    assert states, "no training state appeared before the deadline"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()
    epoch_at_kill = torch.load(states[0], weights_only=False)["epoch"]
    assert 2 <= epoch_at_kill < 5
    result = subprocess.run(_wsseg("-v", "recipe", "run", "--resume", str(killed)), env=env, capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming after epoch" in (killed / "run.log").read_text()
    a = json.loads((reference / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert b["classifier"]["final_loss"] == pytest.approx(a["classifier"]["final_loss"], rel=1e-3, abs=1e-4)
    for producer in ("gradcam", "unet"):
        assert b[producer]["dice"] == pytest.approx(a[producer]["dice"], abs=0.02), producer


def test_resume_skips_finished_stages(tmp_path, capsys):
    out = tmp_path / "run"
    overrides = tiny_demo_overrides(("gradcam",)) + ["segment.masks=gradcam", "export.enabled=false",
                                                     "pseudo_masks.variants=[]"]
    assert main(["recipe", "run", "demo", "--out", str(out), *overrides]) == 0
    first = json.loads((out / "metrics.json").read_text())
    assert main(["recipe", "run", "--resume", str(out)]) == 0
    second = json.loads((out / "metrics.json").read_text())
    assert {"classifier", "maps_gradcam", "masks_gradcam", "unet_round0", "unet_round1"} <= set(second["resumed_skipped_stages"])
    assert second["gradcam"]["dice"] == first["gradcam"]["dice"]
    # A changed stage config runs that stage again.
    assert main(["recipe", "run", "--resume", str(out), "segment.epochs=2"]) == 0
    third = json.loads((out / "metrics.json").read_text())
    assert "unet_round0" not in third["resumed_skipped_stages"] and "classifier" in third["resumed_skipped_stages"]
    # Maps made another way are other training masks: the U-Net trains again, not only the maps.
    assert main(["recipe", "run", "--resume", str(out), "segment.epochs=2", "maps.tta.hflip=true"]) == 0
    fourth = json.loads((out / "metrics.json").read_text())
    assert "unet_round0" not in fourth["resumed_skipped_stages"] and "classifier" in fourth["resumed_skipped_stages"]
    assert "masks_gradcam" not in fourth["resumed_skipped_stages"]  # the pseudo-masks of the new maps


def test_adding_a_self_training_round_reuses_the_finished_unet(tmp_path):
    out = tmp_path / "run"
    overrides = tiny_demo_overrides(("gradcam",)) + ["segment.masks=gradcam", "export.enabled=false",
                                                     "pseudo_masks.variants=[]", "segment.self_training_rounds=0"]
    assert main(["recipe", "run", "demo", "--out", str(out), *overrides]) == 0
    first = json.loads((out / "metrics.json").read_text())
    first_unet = (out / "checkpoints" / "unet.pth").read_bytes()
    assert main(["recipe", "run", "--resume", str(out), "segment.self_training_rounds=1"]) == 0
    second = json.loads((out / "metrics.json").read_text())
    # Round 0 of the longer run is the finished U-Net: reused, not trained again; round 1 is new.
    assert "unet_round0" in second["resumed_skipped_stages"] and "unet_round1" not in second["resumed_skipped_stages"]
    assert (out / "checkpoints" / "unet_round0.pth").read_bytes() == first_unet
    assert second["unet_round0"]["dice"] == first["unet"]["dice"]
    assert (out / "checkpoints" / "unet.pth").read_bytes() != first_unet


def test_a_moved_run_resumes_and_self_training_refines_its_labels(tmp_path, monkeypatch):
    out = tmp_path / "run"
    overrides = tiny_demo_overrides(("gradcam",)) + ["segment.masks=gradcam", "export.enabled=false",
                                                     "pseudo_masks.variants=[]", "segment.self_training_rounds=0"]
    assert main(["recipe", "run", "demo", "--out", str(out), *overrides]) == 0
    moved = tmp_path / "elsewhere" / "run_copy"
    moved.parent.mkdir()
    out.rename(moved)
    monkeypatch.chdir(tmp_path / "elsewhere")  # stage records must not depend on the working directory
    assert main(["recipe", "run", "--resume", "run_copy", "segment.self_training_rounds=1",
                 "segment.self_training_refine=[{name: largest_component}]"]) == 0
    second = json.loads((moved / "metrics.json").read_text())
    assert {"classifier", "unet_round0"} <= set(second["resumed_skipped_stages"])
    assert 0 <= second["unet_round0_refined"]["dice"] <= 1  # round 1's labels, made on the eval images too
    labels = list((moved / "train_masks").glob("unet_round0-*"))
    assert len(labels) == 1 and any(labels[0].glob("*.png"))
    for path in labels[0].glob("*.png"):  # one object per image after largest_component
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert cv2.connectedComponents((mask == 1).astype(np.uint8))[0] <= 2
    record = json.loads((moved / "stages" / "unet_round1.json").read_text())
    assert record["result"]["checkpoint"] == "{run}/checkpoints/unet_round1.pth"
    # A refinement of the U-Net's own output is a different next round: trained again, round 0 kept.
    assert main(["recipe", "run", "--resume", "run_copy", "segment.self_training_rounds=1",
                 "segment.self_training_refine=[{name: fill_holes}]"]) == 0
    third = json.loads((moved / "metrics.json").read_text())
    assert "unet_round0" in third["resumed_skipped_stages"] and "unet_round1" not in third["resumed_skipped_stages"]
    # Fine-tuning round 0 for its own number of epochs is another round too; round 0 is still reused.
    assert main(["recipe", "run", "--resume", "run_copy", "segment.self_training_rounds=1",
                 "segment.self_training_refine=[{name: fill_holes}]", "segment.self_training_init=previous",
                 "segment.self_training_epochs=2"]) == 0
    fourth = json.loads((moved / "metrics.json").read_text())
    assert "unet_round0" in fourth["resumed_skipped_stages"] and "unet_round1" not in fourth["resumed_skipped_stages"]
    assert len(json.loads((moved / "checkpoints" / "unet_round1_history.json").read_text())) == 2  # round 0 had 1


def test_how_the_unet_predicts_reuses_it_and_reaches_its_checkpoint_and_export(tmp_path):
    out = tmp_path / "run"
    overrides = tiny_demo_overrides(("gradcam",)) + ["segment.masks=gradcam", "export.int8=false",
                                                     "pseudo_masks.variants=[]", "segment.self_training_rounds=0"]
    assert main(["recipe", "run", "demo", "--out", str(out), *overrides]) == 0
    first_weights = load_segmenter(out / "checkpoints" / "unet.pth")[0].state_dict()
    predict = ["segment.predict.size=96", "segment.predict.hflip=true", "segment.predict.vflip=true"]
    assert main(["recipe", "run", "--resume", str(out), *predict]) == 0
    second = json.loads((out / "metrics.json").read_text())
    assert "unet_round0" in second["resumed_skipped_stages"]  # prediction is not training: the U-Net is reused
    model, meta = load_segmenter(out / "checkpoints" / "unet.pth")
    assert all(torch.equal(v, first_weights[k]) for k, v in model.state_dict().items())
    assert (meta.input_size, meta.image_size, meta.flips) == (96, 64, ["hflip", "vflip"])
    exported = read_metadata(out / "model.onnx")
    assert exported["input_size"] == "96" and exported["flips_averaged"] == "hflip,vflip"
    # A self-training round learns from how round 0 predicts: labels (and round 1) change with it, round 0 not.
    assert main(["recipe", "run", "--resume", str(out), *predict, "segment.self_training_rounds=1"]) == 0
    third = json.loads((out / "metrics.json").read_text())
    assert "unet_round0" in third["resumed_skipped_stages"] and "unet_round1" not in third["resumed_skipped_stages"]
    assert main(["recipe", "run", "--resume", str(out), "segment.predict.vflip=false"]) == 0  # resume keeps the rest
    fourth = json.loads((out / "metrics.json").read_text())
    assert "unet_round0" in fourth["resumed_skipped_stages"] and "unet_round1" not in fourth["resumed_skipped_stages"]
    assert "unet_round0_probabilities" not in fourth["resumed_skipped_stages"]
    assert len(list((out / "train_masks").glob("unet_round0-*"))) == 2
    assert main(["recipe", "run", "--resume", str(out)]) == 0  # nothing changed: round 0's predictions reused too
    fifth = json.loads((out / "metrics.json").read_text())
    assert {"unet_round0", "unet_round0_probabilities", "unet_round1"} <= set(fifth["resumed_skipped_stages"])


def test_a_calibrated_mask_threshold_reaches_checkpoint_and_export_and_retrains_nothing(tmp_path):
    out = tmp_path / "run"
    overrides = tiny_demo_overrides(("gradcam",)) + ["segment.masks=gradcam", "export.int8=false",
                                                     "pseudo_masks.variants=[]", "segment.self_training_rounds=1"]
    assert main(["recipe", "run", "demo", "--out", str(out), *overrides]) == 0
    assert load_segmenter(out / "checkpoints" / "unet.pth")[1].threshold == 0.5
    assert main(["recipe", "run", "--resume", str(out), "segment.predict.threshold_mode=calibrated",
                 "pseudo_masks.calibrate.grid=[0.05, 0.3, 0.6, 0.95]"]) == 0
    second = json.loads((out / "metrics.json").read_text())
    # The threshold of a U-Net's masks is neither its training nor its round's labels: all reused.
    assert {"unet_round0", "unet_round0_probabilities", "unet_round1"} <= set(second["resumed_skipped_stages"])
    assert len(list((out / "train_masks").glob("unet_round0-*"))) == 1
    for name in ("unet_round0", "unet"):
        calibration = second["calibration"][name]
        curve = {float(t): d for t, d in calibration["dice_by_threshold"].items()}
        assert calibration["n_images"] == 3 and set(curve) == {0.05, 0.3, 0.6, 0.95}
        assert calibration["threshold"] == max(curve, key=curve.get)
    threshold = second["calibration"]["unet"]["threshold"]
    assert load_segmenter(out / "checkpoints" / "unet.pth")[1].threshold == threshold
    assert float(read_metadata(out / "model.onnx")["threshold"]) == threshold
    calibrated_masks = {p.name: read_binary_mask(p) for p in (out / "masks" / "unet").glob("*.png")}
    assert main(["recipe", "run", "--resume", str(out), "segment.predict.threshold_mode=fixed",
                 "segment.predict.threshold=0.95"]) == 0
    assert load_segmenter(out / "checkpoints" / "unet.pth")[1].threshold == 0.95
    assert float(read_metadata(out / "model.onnx")["threshold"]) == 0.95
    third = json.loads((out / "metrics.json").read_text())
    assert {"unet_round0", "unet_round0_probabilities", "unet_round1"} <= set(third["resumed_skipped_stages"])
    high_masks = {p.name: read_binary_mask(p) for p in (out / "masks" / "unet").glob("*.png")}
    assert calibrated_masks and high_masks.keys() == calibrated_masks.keys()
    assert all((high_masks[k] <= calibrated_masks[k]).all() for k in high_masks)  # a higher threshold marks less
    assert threshold == 0.95 or any((high_masks[k] < calibrated_masks[k]).any() for k in high_masks)


def test_masks_can_predict_otherwise_than_the_self_training_labels(tmp_path):
    out = tmp_path / "run"
    overrides = tiny_demo_overrides(("gradcam",)) + [
        "segment.masks=gradcam", "export.int8=false", "pseudo_masks.variants=[]", "segment.self_training_rounds=1",
        "segment.self_training_refine=[{name: largest_component}]", "segment.predict.size=96",
        "segment.predict.hflip=true"]
    assert main(["recipe", "run", "demo", "--out", str(out), *overrides]) == 0
    first = json.loads((out / "metrics.json").read_text())
    # The labels keep predicting at 96 px with a flip; the masks and the export now predict plainly at 64 px.
    assert main(["recipe", "run", "--resume", str(out), "segment.self_training_predict={size: 96, hflip: true}",
                 "segment.predict.size=64", "segment.predict.hflip=false"]) == 0
    second = json.loads((out / "metrics.json").read_text())
    assert {"unet_round0", "unet_round0_probabilities", "unet_round1"} <= set(second["resumed_skipped_stages"])
    assert len(list((out / "train_masks").glob("unet_round0-*"))) == 1  # the same labels
    assert second["unet_round0_refined"] == first["unet_round0_refined"]  # made on val as before, too
    meta = load_segmenter(out / "checkpoints" / "unet.pth")[1]
    assert (meta.input_size, meta.flips) == (64, []) and read_metadata(out / "model.onnx")["input_size"] == "64"
    assert second["unet"] != first["unet"] or second["unet_round0"] != first["unet_round0"]


def test_fitted_maps_learn_from_maps_fit_dataset_and_refit_when_it_changes(tmp_path, monkeypatch):
    import wsseg.pipeline.masks

    fitted = []

    def recording_fit(method, dataset, indices, *args, **kwargs):
        assert method.method.n_concepts == 2  # from maps.method_options (TTAMaps wraps the method)
        fitted.append((dataset.split, len(indices)))
        return original(method, dataset, indices, *args, **kwargs)

    original = wsseg.pipeline.masks.fit_map_method
    monkeypatch.setattr(wsseg.pipeline.masks, "fit_map_method", recording_fit)
    out = tmp_path / "run"
    fit_set = "{name: synthetic, split: fitset, options: {n: 10, size: 64}}"
    overrides = tiny_demo_overrides(("gradcam", "dff")) + [
        "segment.masks=dff", "export.enabled=false", "pseudo_masks.variants=[]", "segment.self_training_rounds=0",
        f"maps.fit_dataset={fit_set}", "maps.method_options={dff: {n_concepts: 2}}"]
    assert main(["recipe", "run", "demo", "--out", str(out), *overrides]) == 0
    positives = create_dataset(DatasetConfig("synthetic", None, "fitset", options={"n": 10, "size": 64})).labels.sum()
    # Only dff learns; the val maps, calibration maps and U-Net training maps all fit on the fit set's positives.
    assert fitted and set(fitted) == {("fitset", int(positives))}
    assert 0 <= json.loads((out / "metrics.json").read_text())["dff"]["dice"] <= 1
    fitted.clear()
    assert main(["recipe", "run", "--resume", str(out), "maps.fit_dataset.options.n=12"]) == 0
    assert fitted and set(fitted) == {("fitset", int(create_dataset(DatasetConfig(
        "synthetic", None, "fitset", options={"n": 12, "size": 64})).labels.sum()))}
    skipped = json.loads((out / "metrics.json").read_text())["resumed_skipped_stages"]
    assert "classifier" in skipped and "maps_gradcam" not in skipped  # fingerprint changed: maps rerun


def test_fingerprint_counts_every_value_and_the_cache_format():
    from wsseg.pipeline import executor
    from wsseg.pipeline.executor import fingerprint

    assert fingerprint(ClassifierConfig(), 0) == fingerprint(ClassifierConfig(), 0)
    assert fingerprint(ClassifierConfig(schedule="concat"), 0) != fingerprint(ClassifierConfig(), 0)
    assert fingerprint(ClassifierConfig(), 1) != fingerprint(ClassifierConfig(), 0)
    nested = RecipeConfig(name="a")
    changed = RecipeConfig(name="a")
    changed.maps.tta.scales = [1.0, 1.5]
    assert fingerprint(nested) != fingerprint(changed)
    before = fingerprint(ClassifierConfig())
    executor.CACHE_FORMAT += 1
    try:
        assert fingerprint(ClassifierConfig()) != before  # another cache format: every stage runs again
    finally:
        executor.CACHE_FORMAT -= 1


def test_a_stage_recorded_by_another_wsseg_version_runs_again_and_says_why(tmp_path):
    out = tmp_path / "run"
    overrides = tiny_demo_overrides(("gradcam",)) + ["segment=null", "export.enabled=false",
                                                     "pseudo_masks.variants=[]"]
    assert main(["recipe", "run", "demo", "--out", str(out), *overrides]) == 0
    record_path = out / "stages" / "classifier.json"
    record = json.loads(record_path.read_text())
    del record["format"]  # as an older wsseg wrote it
    record_path.write_text(json.dumps(record))
    assert main(["recipe", "run", "--resume", str(out)]) == 0
    skipped = json.loads((out / "metrics.json").read_text())["resumed_skipped_stages"]
    assert "classifier" not in skipped and "maps_gradcam" in skipped
    assert "stage classifier: recorded by another wsseg version (cache format 1, now" in (out / "run.log").read_text()


def test_a_folder_stage_resumes_inside_itself_and_a_new_fingerprint_starts_it_clean(tmp_path):
    """An interrupted per-image stage keeps what it wrote for the same fingerprint; another fingerprint (or a
    run that does not resume) removes the old files before writing."""
    from wsseg.pipeline import RunLayout, StageExecutor

    layout = RunLayout(tmp_path / "run")
    folder = layout.root / "maps" / "m"
    written, handed = [], []

    def write(stems, stop_after=None):
        def work(done):
            handed.append(set(done))
            folder.mkdir(parents=True, exist_ok=True)
            for n, stem in enumerate(s for s in stems if s not in done):
                if stop_after is not None and n == stop_after:
                    raise KeyboardInterrupt  # the job is stopped here
                np.save(folder / f"{stem}.npy", np.zeros(2))
                written.append(stem)
        return work

    stems = ["a", "b", "c", "d"]
    with pytest.raises(KeyboardInterrupt):
        StageExecutor(layout, resume=False).cached_folder("maps_m", "fp1", folder, write(stems, stop_after=2))
    assert sorted(p.stem for p in folder.glob("*.npy")) == ["a", "b"]
    StageExecutor(layout, resume=True).cached_folder("maps_m", "fp1", folder, write(stems))
    assert handed[-1] == {"a", "b"} and written == ["a", "b", "c", "d"]  # c and d only, after the resume
    assert (layout.stage_record("maps_m")).is_file()

    (folder / "d.npy").unlink()  # the stage's output changed behind its back: the record is not trusted
    layout.stage_record("maps_m").unlink()
    written.clear()
    StageExecutor(layout, resume=True).cached_folder("maps_m", "fp2", folder, write(["a", "x"]))
    assert handed[-1] == set() and written == ["a", "x"]
    assert sorted(p.stem for p in folder.glob("*.npy")) == ["a", "x"]  # b and c were another fingerprint's


# ----------------------------------------------------------------------------- bad input

def _write_bad_files(folder: Path) -> dict:
    """One file per kind of damage; returns {file name: whether it should still load}."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    good = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(good).save(folder / "good.jpg")
    Image.fromarray(good).save(folder / "truncated.jpg")
    (folder / "truncated.jpg").write_bytes((folder / "truncated.jpg").read_bytes()[:200])
    Image.fromarray(good).save(folder / "corrupt.png")
    data = bytearray((folder / "corrupt.png").read_bytes())
    data[60:120] = b"\x00" * 60
    (folder / "corrupt.png").write_bytes(bytes(data))
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image")
    Image.fromarray(good[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([good, np.full((40, 40), 255, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray((good[..., 0].astype(np.uint16) * 257)).save(folder / "sixteen.png")
    Image.fromarray(good).convert("P").save(folder / "palette.png")
    Image.fromarray(good[:8, :8]).save(folder / "tiny.png")
    Image.fromarray(rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8)).save(folder / "huge.jpg", quality=50)
    return {"good.jpg": True, "truncated.jpg": False, "corrupt.png": False, "zero.jpg": False, "text.jpg": False,
            "gray.png": True, "rgba.png": True, "sixteen.png": True, "palette.png": True, "tiny.png": True,
            "huge.jpg": True}


def test_bad_images_error_names_the_file_or_skip_counts_them(tmp_path):
    expected = _write_bad_files(tmp_path / "data" / "Train" / "pos")
    _write_bad_files(tmp_path / "data" / "Train" / "neg")
    config = DatasetConfig("class_folders", str(tmp_path / "data"), "Train", options={"positive": "pos"})
    strict = create_dataset(config)
    for i, record in enumerate(strict.records):
        name = record.image_path.name
        if expected[name]:
            image = strict.load_image(i)
            assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
        else:
            with pytest.raises(DataError, match=name.replace(".", r"\.")):
                strict.load_image(i)
    bad = {}
    lenient = create_dataset(config, on_bad_image="skip", bad_images=bad, key="classifier.train.0")
    assert len(lenient) == 2 * sum(expected.values())
    assert len(bad["classifier.train.0"]) == 2 * (len(expected) - sum(expected.values()))


def test_skip_policy_reaches_metrics_json(tmp_path):
    root = tmp_path / "kvasir-seg"
    rng = np.random.default_rng(0)
    for i in range(4):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"k{i}.jpg")
        mask = np.zeros((64, 64), np.uint8)
        mask[10:40, 10:40] = 255
        Image.fromarray(mask).save(root / "masks" / f"k{i}.png")
    (root / "images" / "k3.jpg").write_bytes(b"\xff\xd8broken")
    out = tmp_path / "run"
    overrides = tiny_demo_overrides(("gradcam",)) + [
        "segment=null", "export=null", "pseudo_masks.variants=[]", "maps.dataset.name=kvasir_seg",
        f"maps.dataset.root={root}", "maps.dataset.split=null", "maps.dataset.options={}", "on_bad_image=skip"]
    assert main(["recipe", "run", "demo", "--out", str(out), *overrides]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["gradcam"]["n_images"] == 3
    assert len(metrics["skipped_images"]["maps.dataset"]) == 1 and "k3.jpg" in metrics["skipped_images"]["maps.dataset"][0]
    assert "skipping bad image" in (out / "run.log").read_text()


def test_masks_of_wrong_size_or_not_binary(tmp_path, kvasir_root):
    Image.fromarray((np.arange(48 * 64) % 7 * 30).astype(np.uint8).reshape(48, 64)).save(
        kvasir_root / "masks" / "img1.png")
    (kvasir_root / "masks" / "img1.jpg").unlink()
    ds = create_dataset(DatasetConfig("kvasir_seg", str(kvasir_root), "val"))
    with pytest.raises(DataError, match=r"img1.png: mask is not binary \(7 distinct values"):
        ds.load_mask(0)


def test_empty_folder_and_missing_split_images(tmp_path):
    (tmp_path / "empty" / "Train" / "pos").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        create_dataset(DatasetConfig("class_folders", str(tmp_path / "empty"), "Train", options={"positive": "pos"}))


def test_recipe_with_wrong_type_and_unknown_key_fails_before_running(tmp_path, capsys):
    assert main(["recipe", "run", "demo", "--out", str(tmp_path / "x"), "classifier.epochs=many", "maps.colour=1"]) == 2
    err = capsys.readouterr().err
    assert "classifier.epochs: expected int" in err and "maps.colour: unknown key" in err
    assert not (tmp_path / "x").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import wsseg.stages.classifier as classifier_stage

    calls = {"n": 0}
    real = classifier_stage.F.cross_entropy

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 4 else loss  # the first epoch (4 batches) is fine

    monkeypatch.setattr(classifier_stage.F, "cross_entropy", poisoned)
    config = ClassifierConfig(train=[DatasetConfig("synthetic", None, "train", options={"n": 32, "size": 32})],
                              image_size=32, epochs=3, batch_size=8, amp=False)
    with pytest.raises(NonFiniteLoss, match=r"loss became nan in epoch 2.*last good state is .*epoch 1"):
        classifier_stage.train_classifier(config, BackboneConfig(TINY_MODEL, "none"), tmp_path, "cpu")
    state = torch.load(tmp_path / "classifier.state.pth", weights_only=False)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_unwritable_or_full_output_folder_is_a_clear_error(tmp_path, monkeypatch):
    target = tmp_path / "file-not-folder"
    target.write_text("x")
    with pytest.raises(WssegError, match="cannot write to run directory"):
        prepare_run_dir(target / "run")
    original = Path.write_text

    def disk_full(self, *args, **kwargs):
        if self.name == ".write-test":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(WssegError, match="No space left on device"):
        prepare_run_dir(tmp_path / "run")

    def read_only(self, *args, **kwargs):  # as root, chmod cannot make a folder read-only: simulate EROFS
        if self.name == ".write-test":
            raise OSError(errno.EROFS, "Read-only file system")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    with pytest.raises(WssegError, match=r"cannot write to run directory .*Read-only file system"):
        prepare_run_dir(tmp_path / "run2")


def test_atomic_mask_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from wsseg.data.io import write_mask_png

    def fail(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(OSError):
        write_mask_png(tmp_path / "m.png", np.ones((4, 4), bool))
    assert not (tmp_path / "m.png").exists()


def test_unet_encoder_from_the_trained_classifier(tmp_path, monkeypatch):
    import wsseg.stages.segment
    from wsseg.models.classifier import load_classifier

    built = []

    def recording_build(encoder, weights, decoder_channels=None):
        model = original(encoder, weights, decoder_channels)
        built.append({k: v.clone() for k, v in model.encoder.model.state_dict().items()})
        return model

    original = wsseg.stages.segment.build_unet
    monkeypatch.setattr(wsseg.stages.segment, "build_unet", recording_build)
    out = tmp_path / "run"
    # CCAM's maps (polarity from the border cue) do not need the classifier: it is trained for the U-Net alone.
    overrides = tiny_demo_overrides(("ccam",)) + ["segment.masks=ccam", "maps.method_options.ccam.polarity=border", "export.enabled=false",
                                                  "pseudo_masks.variants=[]", "segment.self_training_rounds=0",
                                                  "segment.encoder_weights=classifier"]
    assert main(["recipe", "run", "demo", "--out", str(out), *overrides]) == 0
    classifier, _ = load_classifier(out / "checkpoints" / "classifier.pth")
    trained = classifier.state_dict()
    assert len(built) == 1 and built[0]  # the encoder started from the classifier's trained weights
    assert all(torch.equal(value, trained[key]) for key, value in built[0].items() if key in trained)
    assert sum(key in trained for key in built[0]) == len(built[0])
    # Another classifier is another starting point: the U-Net trains again on the same maps.
    assert main(["recipe", "run", "--resume", str(out), "classifier.epochs=2"]) == 0
    skipped = json.loads((out / "metrics.json").read_text()).get("resumed_skipped_stages", [])
    assert "maps_ccam" in skipped and "classifier" not in skipped and not {"unet_round0", "unet_round1"} & set(skipped) and len(built) == 2


def test_unet_encoder_from_the_classifier_needs_its_backbone():
    from wsseg.config import parse_recipe

    with pytest.raises(ConfigError, match=r"segment.encoder_weights: 'classifier' needs the classifier's backbone"):
        parse_recipe({"maps": {"methods": ["gradcam"]}, "classifier": {"train": [{"name": "synthetic"}]},
                      "segment": {"masks": "gradcam", "train": [{"name": "synthetic"}], "encoder": "resnet18",
                                  "encoder_weights": "classifier"}})
