"""The model card: every path preprocesses an image the way its checkpoint says, with no argument
passed, and a pair whose manifest and checkpoint disagree is refused. Checkpoints are 0-epoch ones
written in-process (conftest.tiny_checkpoint), one per resize mode; the Ray jobs are real."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import noise_images, tiny_checkpoint, tiny_index

ROOT = Path(__file__).resolve().parents[1]
OTHER = {"squash": "center_crop", "center_crop": "squash"}


def _shards(folder: Path, images: list[bytes]) -> str:
    from msc_dist.data.shards import ShardWriter

    with ShardWriter(str(folder), per_shard=10) as w:
        for i, b in enumerate(images):
            w.write(f"n{i:03d}", b, "png", label=0)
    return str(folder)


@pytest.mark.parametrize("mode", ["squash", pytest.param("center_crop", marks=pytest.mark.slow)])
def test_every_path_preprocesses_by_the_checkpoints_card(local_ray, tmp_path, mode):
    """Embedding job, score job, predict, test and export, none told the mode: all decode as the
    checkpoint says (the other mode gives other features and scores, so a path that fell back to
    a default would fail here for one of the two modes)."""
    import pyarrow.parquet as pq

    from msc_dist.card import load_card
    from msc_dist.data.decode import decode_image
    from msc_dist.embed.config import EmbedConfig
    from msc_dist.embed.job import main as embed_main
    from msc_dist.export import ExportConfig, main as export_main
    from msc_dist.index import version_root
    from msc_dist.predict import PredictConfig, predict
    from msc_dist.score.config import ScoreConfig
    from msc_dist.score.job import main as score_main, read_scores
    from msc_dist.scorer import open_scorer

    normals = noise_images(24, seed=1)
    data = _shards(tmp_path / "data", normals)
    ck = tiny_checkpoint(tmp_path / "ck", image_size=32, resize_mode=mode, data=data)
    card = load_card(ck)
    assert (card.preprocess.image_size, card.preprocess.resize_mode) == (32, mode)

    def decoded(images, m):
        return np.stack([decode_image(b, 32, resize_mode=m) for b in images])

    # The embedding job: every row is the card's decode, not the other mode's.
    out = tmp_path / "idx"
    res = embed_main(EmbedConfig(checkpoint=ck, out=str(out), batch_size=8, rows_per_task=8, rows_per_file=8))
    man = res.manifest
    assert man.extra["resize_mode"] == mode and man.extra["preprocess"] == card.preprocess.to_dict()
    root = version_root(str(out), man.version)
    rows = {}
    for e in man.extra["embeddings"]:
        t = pq.read_table(os.path.join(root, e["file"]))
        rows.update(zip(t["id"].to_pylist(), t["embedding"].to_numpy(zero_copy_only=False)))
    keys = sorted(rows)[:6]
    got = np.stack([rows[k] for k in keys])
    by_key = {f"n{i:03d}": b for i, b in enumerate(normals)}
    want = {m: card.embed_arrays(decoded([by_key[k] for k in keys], m)) for m in (mode, OTHER[mode])}
    assert np.abs(got - want[mode]).max() < 1e-5 < np.abs(got - want[OTHER[mode]]).max()

    # Scores of new images: the Scorer, the score job, predict (all with no mode given).
    queries = noise_images(5, seed=2)
    folder = tmp_path / "in"
    folder.mkdir()
    for i, b in enumerate(queries):
        (folder / f"q{i}.png").write_bytes(b)
    scorer = open_scorer(str(out))
    expected = [r.score for r in scorer.score_arrays(decoded(queries, mode))]
    elsewise = [r.score for r in scorer.score_arrays(decoded(queries, OTHER[mode]))]
    assert max(abs(a - b) for a, b in zip(expected, elsewise)) > 1e-4
    assert [r.score for r in scorer.score_bytes(queries)] == pytest.approx(expected, abs=1e-6)
    score_main(ScoreConfig(index=str(out), input=str(folder), out=str(tmp_path / "scores"), batch_size=4))
    t = read_scores(str(tmp_path / "scores")).to_pydict()
    offline = {os.path.basename(u): s for u, s in zip(t["uri"], t["score"])}
    assert [offline[f"q{i}.png"] for i in range(5)] == pytest.approx(expected, abs=1e-5)
    rows = predict(PredictConfig(paths=[str(folder)], index=str(out), device="cpu"))
    assert [r["score"] for r in rows] == pytest.approx(expected, abs=1e-5)
    assert {r["index_version"] for r in rows} == {man.version}

    # The export records the card and checks itself on images decoded by it.
    exp = export_main(ExportConfig(checkpoint=ck, out=str(tmp_path / "export"), index=str(out), check_images=2),
                      log=lambda *_: None)
    spec = json.loads((tmp_path / "export" / "export.json").read_text())
    assert spec["input"]["resize_mode"] == mode and spec["preprocessing"] == card.preprocess.to_dict()
    assert exp.max_abs_diff <= 1e-4


def test_a_manifest_that_disagrees_with_its_checkpoint_is_refused(tmp_path):
    """The score job (before Ray starts), the Scorer and the export refuse an index whose manifest
    records another image size or resize mode than the checkpoint that it names."""
    from msc_dist.export import ExportConfig, main as export_main
    from msc_dist.index import IndexMismatch, read_manifest, version_root
    from msc_dist.score.config import ScoreConfig
    from msc_dist.score.job import main as score_main
    from msc_dist.scorer import open_scorer

    ck = tiny_checkpoint(tmp_path / "ck", image_size=32, resize_mode="center_crop")
    good = tiny_index(tmp_path / "good", ck, {f"n{i}": b for i, b in enumerate(noise_images(6))})
    open_scorer(str(tmp_path / "good"))  # the pair as written is fine
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(noise_images(1)[0])
    for name, change, words in (("size", {"image_size": 40}, "image_size 40"),
                                ("mode", {"resize_mode": "squash"}, "resize_mode squash")):
        idx = tmp_path / name
        man_path = Path(version_root(str(tmp_path / "good"), good.version)) / "manifest.json"
        # A manifest edited by hand (or written by another tool), republished under a new root.
        import shutil

        shutil.copytree(tmp_path / "good", idx)
        man, folder_v = read_manifest(str(idx))
        from msc_dist.index import IndexManifest, publish

        publish(str(idx), IndexManifest(**{**man.__dict__, "extra": {**man.extra, **change}}))
        with pytest.raises(IndexMismatch, match=f"records {words}.*disagree"):
            score_main(ScoreConfig(index=str(idx), input=str(folder), out=str(tmp_path / f"s-{name}")))
        with pytest.raises(IndexMismatch, match="disagree"):
            open_scorer(str(idx))
        with pytest.raises(IndexMismatch, match="disagree"):
            export_main(ExportConfig(checkpoint=ck, out=str(tmp_path / f"e-{name}"), index=str(idx)), log=lambda *_: None)
        assert man_path.exists()
    assert not (tmp_path / "s-size").exists()  # refused before anything was written


def _defaults(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            pos = a.posonlyargs + a.args
            pairs = list(zip(pos, [None] * (len(pos) - len(a.defaults)) + list(a.defaults)))
            pairs += list(zip(a.kwonlyargs, a.kw_defaults))
            for arg, default in pairs:
                if default is not None:
                    yield node.name, arg.arg


def test_no_function_defaults_a_resize_mode_or_an_image_size():
    """A caller that forgets the argument must fail, not silently squash: the mode and the size
    come from the checkpoint's card. (The one exception writes a checkpoint: its value is the card.)"""
    allowed = {("msc_dist/bench/scale.py", "make_tiny_checkpoint", "image_size")}
    found = []
    for folder in ("msc_dist", "serving"):
        for p in sorted((ROOT / folder).rglob("*.py")):
            rel = str(p.relative_to(ROOT))
            found += [(rel, fn, arg) for fn, arg in _defaults(p) if arg in ("resize_mode", "image_size")]
    assert set(found) <= allowed, sorted(set(found) - allowed)
