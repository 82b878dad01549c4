"""`wsseg compare`: two real runs of one recipe with different seeds, side by side."""

import csv
import json

import pytest

from conftest import tiny_demo_overrides
from wsseg.cli.main import main


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    overrides = tiny_demo_overrides(("gradcam",)) + ["segment.masks=gradcam", "export.enabled=false",
                                                     "pseudo_masks.variants=[]", "segment.self_training_rounds=0"]
    runs = []
    for seed in (0, 1):
        out = root / f"seed{seed}"
        assert main(["recipe", "run", "demo", "--out", str(out), *overrides, f"seed={seed}"]) == 0
        runs.append(out)
    return runs


def test_each_producer_per_run_with_mean_and_range(two_seeds, tmp_path, capsys):
    metrics = [json.loads((run / "metrics.json").read_text()) for run in two_seeds]
    for m in metrics:  # the invocation's own wall time, at least its longest stage
        assert m["wall_s"] >= max(m["timings_s"].values()) > 0
    assert main(["compare", *map(str, two_seeds), "--out", str(tmp_path)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "(seed 0)" in printed and "(seed 1)" in printed
    with (tmp_path / "compare.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for producer in ("gradcam", "unet", "center_ellipse", "all_foreground"):
        got = {row["seed"]: float(row["dice"]) for row in rows if row["producer"] == producer}
        assert got == {str(s): pytest.approx(metrics[s][producer]["dice"], abs=1e-6) for s in (0, 1)}
    markdown = (tmp_path / "compare.md").read_text()
    unet = [m["unet"]["dice"] for m in metrics]
    line = next(l for l in markdown.splitlines() if l.startswith("| unet |"))
    assert f"| {sum(unet) / 2:.4f} | {min(unet):.4f}-{max(unet):.4f} |" in line
    # The producers come best mean first.
    means = [float(l.split("|")[2]) for l in markdown.split("\n\n")[0].splitlines()[2:]]
    assert means == sorted(means, reverse=True) and len(means) >= 4


def test_unfinished_or_broken_runs_are_named(two_seeds, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    assert main(["compare", str(two_seeds[0]), str(unfinished)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{unfinished / 'metrics.json'} does not exist" in err and "--resume" in err
    (unfinished / "metrics.json").write_text("{not json")
    assert main(["compare", str(unfinished)]) == 2
    assert f"{unfinished / 'metrics.json'}: not valid JSON" in " ".join(capsys.readouterr().err.split())
    assert main(["compare", str(two_seeds[0]), "--metric", "hausdorff"]) == 2
    assert "'hausdorff'" in capsys.readouterr().err
