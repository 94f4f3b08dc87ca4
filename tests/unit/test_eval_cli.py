"""The eval command and its data sources, on a tiny seeded model."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from app.cli import main
from app.eval.batches import list_image_dir, read_labels_file
from tests.helpers import save_self_describing


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    return save_self_describing(path, "deit_tiny", seed=1, labels=[f"c{i}" for i in range(7)])


def _rows(path):
    with path.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_eval_synthetic_writes_table_csv_and_figure(tiny_weights, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "eval",
            "--model",
            str(tiny_weights),
            "--limit",
            "4",
            "--batch-size",
            "3",
            "--steps",
            "2",
            "--methods",
            "reciprocam,rollout,gradcam",
            "--figure-images",
            "2",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "reciprocam" in printed and "pointing" in printed
    rows = _rows(out / "results.csv")
    assert [row["method"] for row in rows] == ["reciprocam", "rollout", "gradcam"]
    for row in rows:
        assert row["images"] == "4"
        for column in (
            "drop",
            "increase",
            "coherency",
            "complexity",
            "adcc",
            "insertion",
            "deletion",
            "pointing",
        ):
            value = float(row[column])
            assert 0.0 <= value <= 1.0, (column, value)
        correct = float(row["pointing_correct"])  # nan when the random model gets none right
        assert np.isnan(correct) or 0.0 <= correct <= 1.0
    markdown = (out / "results.md").read_text(encoding="utf-8")
    assert "| reciprocam |" in markdown and "ADCC" in markdown
    figure = Image.open(out / "eval_grid.png")
    assert figure.width > figure.height  # 4 columns (input + 3 methods), 2 rows
    assert figure.mode == "RGB"


def test_eval_image_folder_with_class_folders(tiny_weights, tmp_path):
    rng = np.random.default_rng(0)
    for class_name in ("a_first", "b_second"):
        folder = tmp_path / "images" / class_name
        folder.mkdir(parents=True)
        for index in range(2):
            pixels = rng.integers(0, 255, size=(40, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")
    out = tmp_path / "out"
    code = main(
        [
            "eval",
            "--model",
            str(tiny_weights),
            "--data",
            str(tmp_path / "images"),
            "--limit",
            "0",
            "--steps",
            "0",
            "--methods",
            "reciprocam",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    (row,) = _rows(out / "results.csv")
    assert row["images"] == "4"
    assert row["pointing"] == "nan" and row["insertion"] == "nan"  # no masks, no curves
    assert row["pointing_correct"] == "nan"
    assert 0.0 <= float(row["adcc"]) <= 1.0


def test_pointing_on_correct_images_keeps_exactly_the_correctly_classified_ones(tiny_weights):
    """The pointing column over correct images is the pointing hits of the images whose prediction
    equals the label, in order: checked against the model's own predictions."""
    import torch

    from app.engine.models import load_model
    from app.eval.batches import synthetic_batches
    from app.eval.evaluate import evaluate

    loaded = load_model(None, tiny_weights)
    report = evaluate(
        loaded,
        synthetic_batches(loaded, seed=3, limit=12, batch_size=5),
        ["rollout"],
        total=12,
        steps=0,
        progress=False,
    )
    predicted, labels = [], []
    for batch in synthetic_batches(loaded, seed=3, limit=12, batch_size=5):
        with torch.no_grad():
            predicted += loaded.model(batch.inputs).argmax(-1).tolist()
        labels += batch.labels.tolist()
    correct = [p == y for p, y in zip(predicted, labels, strict=True)]
    assert 0 < sum(correct) < len(correct)  # the seeded tiny model gets some right, some wrong
    scores = report.scores["rollout"]
    assert len(scores.pointing) == 12
    assert scores.pointing_correct == [hit for hit, ok in zip(scores.pointing, correct, strict=True) if ok]
    assert report.accuracy == sum(correct) / len(correct)


def test_eval_rejects_unknown_methods_and_missing_data(tiny_weights, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_weights), "--methods", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown methods" in capsys.readouterr().err
    missing = str(tmp_path / "missing")
    assert main(["eval", "--model", str(tiny_weights), "--data", missing, "--out", str(tmp_path)]) == 2


def test_labels_file_and_folder_listing(tmp_path):
    root = tmp_path / "val"
    root.mkdir()
    for name in ("x1.JPEG", "x2.JPEG", "x3.JPEG"):
        Image.new("RGB", (8, 8)).save(root / name, format="JPEG")
    labels = tmp_path / "val.txt"
    labels.write_text("name,label\nx2.JPEG,7\nx1.JPEG 3\n\n# comment\nabsent.JPEG 1\n", encoding="utf-8")
    assert read_labels_file(labels) == {"x2.JPEG": 7, "x1.JPEG": 3, "absent.JPEG": 1}
    assert [(p.name, c) for p, c in list_image_dir(root, labels)] == [("x1.JPEG", 3), ("x2.JPEG", 7)]
    # a flat folder without labels: no class ids
    assert [(p.name, c) for p, c in list_image_dir(root)] == [
        ("x1.JPEG", None),
        ("x2.JPEG", None),
        ("x3.JPEG", None),
    ]
    bad = tmp_path / "bad.txt"
    bad.write_text("x1.JPEG\n", encoding="utf-8")
    with pytest.raises(ValueError):
        read_labels_file(bad)


def test_pointing_pairs_match_the_per_image_hits(tiny_weights, tmp_path, capsys):
    """Wins, losses, misses and the McNemar p-value of the paired table are the per-image pointing
    hits of the two methods, counted here independently; the CLI writes the table."""
    from app.engine.models import load_model
    from app.eval import metrics
    from app.eval.batches import synthetic_batches
    from app.eval.evaluate import evaluate
    from app.eval.report import pointing_pairs_table

    loaded = load_model(None, tiny_weights)
    methods = ["reciprocam", "gradcam", "rollout"]
    report = evaluate(
        loaded,
        synthetic_batches(loaded, seed=3, limit=16, batch_size=6),
        methods,
        total=16,
        steps=0,
        progress=False,
    )
    reference = report.scores["rollout"].pointing
    rows = report.pointing_pairs("rollout")
    assert [row["method"] for row in rows] == ["reciprocam", "gradcam"]
    discordant = 0
    for row in rows:
        hits = report.scores[str(row["method"])].pointing
        wins = sum(1 for a, b in zip(hits, reference, strict=True) if a == 1.0 and b == 0.0)
        losses = sum(1 for a, b in zip(hits, reference, strict=True) if a == 0.0 and b == 1.0)
        discordant += wins + losses
        assert (row["wins"], row["losses"]) == (wins, losses)
        assert row["misses"] == hits.count(0.0) and row["reference_misses"] == reference.count(0.0)
        assert row["p"] == metrics.exact_mcnemar(wins, losses)
        assert row["images_correct"] == len(report.scores["rollout"].pointing_correct)
    assert discordant > 0  # the random model's methods disagree somewhere, so the counts are tested
    assert report.pointing_pairs("no-such-method") == []
    table = pointing_pairs_table(report, "rollout")
    assert table.splitlines()[2].startswith(
        f"| reciprocam | {rows[0]['misses']} | {rows[0]['reference_misses']} |"
    )

    out = tmp_path / "out"
    args = ["eval", "--model", str(tiny_weights), "--limit", "4", "--steps", "0", "--no-progress"]
    assert main([*args, "--methods", "reciprocam,rollout", "--out", str(out)]) == 0
    assert "paired against rollout" in (out / "results.md").read_text(encoding="utf-8")
    assert "paired against rollout" in capsys.readouterr().out
    (pair,) = _rows(out / "pointing_pairs.csv")
    assert pair["method"] == "reciprocam" and pair["reference"] == "rollout"
    assert int(pair["images"]) == 4 and 0.0 <= float(pair["p"]) <= 1.0
    assert int(pair["wins"]) + int(pair["losses"]) <= 4
    (out / "pointing_pairs.csv").unlink()
    assert main([*args, "--methods", "reciprocam", "--out", str(out)]) == 0
    assert "paired against" not in (out / "results.md").read_text(encoding="utf-8")
    assert not (out / "pointing_pairs.csv").exists()
    assert main([*args, "--pointing-reference", "nope", "--out", str(out)]) == 2


def test_eval_pairs_writes_tables_and_rollout_cannot_hit_both(tiny_weights, tmp_path, capsys):
    out = tmp_path / "pairs"
    code = main(
        [
            "eval",
            "--model",
            str(tiny_weights),
            "--data",
            "synthetic-pairs",
            "--limit",
            "6",
            "--batch-size",
            "4",
            "--methods",
            "reciprocam,rollout",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "two-object synthetic shapes" in printed and "| reciprocam |" in printed
    rows = {row["method"]: row for row in _rows(out / "pairs.csv")}
    assert set(rows) == {"reciprocam", "rollout"}
    assert all(row["images"] == "6" for row in rows.values())
    # one class-independent peak can never count for both objects, which are > 8 px apart
    assert float(rows["rollout"]["both"]) == 0.0
    assert float(rows["rollout"]["class_pointing"]) <= 0.5
    assert "| Method | Class pointing" in (out / "pairs.md").read_text(encoding="utf-8")
    with Image.open(out / "pairs_grid.png") as grid:  # 6 rows (the default figure images) x 5 tiles
        assert grid.size == (5 * 112, 16 + 6 * 112)


def test_pair_report_summaries_are_counted_from_the_hits():
    from app.eval.pairs import PairReport

    hits = {
        "a": np.array([[1, 1], [1, 0], [0, 0], [1, 1]], dtype=float),
        "b": np.array([[1, 0], [0, 1], [0, 0], [1, 0]], dtype=float),
    }
    report = PairReport(methods=["a", "b"], hits=hits, images=4, top2_match=0.5)
    rows = {row["method"]: row for row in report.rows()}
    assert rows["a"]["class_pointing"] == pytest.approx(5 / 8)
    assert rows["a"]["both"] == pytest.approx(2 / 4) and rows["a"]["neither"] == pytest.approx(1 / 4)
    assert rows["b"]["class_pointing"] == pytest.approx(3 / 8) and rows["b"]["both"] == 0.0
    # over the 8 (image, object) pairs: a alone hits (0,1), (1,0), (3,1); b alone hits (1,1)
    wins, losses, p = report.paired("b")["a"]
    assert (wins, losses) == (3, 1)
    assert p == pytest.approx(0.625)  # 2 * P(X <= 1), X ~ Binomial(4, 1/2) = 2 * 5/16


def test_eval_says_what_it_explained_and_why_pairs_are_missing(tiny_weights, tmp_path, capsys):
    """A folder without labels explains the prediction and says so; without the reference method the
    paired table is replaced by a line saying how to get it; every file written is listed."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        Image.new("RGB", (30, 30), (40 * i, 90, 160)).save(flat / f"{i}.png")
    common = ["eval", "--model", str(tiny_weights), "--steps", "0", "--figure-images", "0", "--no-progress"]
    assert main([*common, "--data", str(flat), "--methods", "reciprocam", "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "class explained: predicted (the images have no labels)" in printed
    assert "class explained: label" not in printed
    out = tmp_path / "b"
    args = [*common, "--limit", "3", "--methods", "reciprocam", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "its reference method, rollout, was not run; add it to --methods" in printed
    assert "reference method, rollout" in (out / "results.md").read_text(encoding="utf-8")
    out = tmp_path / "c"
    assert main([*common, "--limit", "3", "--methods", "reciprocam,rollout", "--out", str(out)]) == 0
    wrote = capsys.readouterr().out.strip().splitlines()[-1]
    assert wrote == f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'pointing_pairs.csv'}"
    assert (out / "pointing_pairs.csv").is_file()


def test_eval_refuses_options_that_would_be_ignored(tiny_weights, tmp_path, capsys):
    import pytest

    base = ["eval", "--model", str(tiny_weights), "--out", str(tmp_path)]
    assert main([*base, "--data", "synthetic-pairs", "--steps", "8"]) == 2
    assert "--steps does not apply" in capsys.readouterr().err
    assert main([*base, "--data", "synthetic-pairs", "--target", "predicted", "--steps", "4"]) == 2
    assert "--steps and --target do not apply" in capsys.readouterr().err
    for data in ("synthetic", "synthetic-pairs"):
        assert main([*base, "--data", data, "--limit", "0"]) == 2
        assert "write the number of images" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--limit", "-1"])
    assert exit_info.value.code == 2


def test_eval_finds_the_shipped_model_from_any_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--limit", "2", "--methods", "reciprocam", "--steps", "0", "--figure-images", "0"]
    assert main([*args, "--no-progress", "--model", "app/weights/shapes_vit.safetensors"]) == 0
    assert "images: 2" in capsys.readouterr().out
