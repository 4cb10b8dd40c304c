"""`fr_eval MODEL --ijb DIR`: the IJB-B/C protocol on a synthetic release in insightface's exact formats
(tests/ijb_release.py), checked number for number against a float64 computation written here, for
torch and ONNX models, with the per-image features saved and read back, and every bad input refused
with one line naming the file."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.array_file import read_array_file
from data_pipeline.synthetic import SyntheticConfig
from fr_train.backbones import build_backbone
from fr_train.evaluation.cli import main
from fr_train.export import export_onnx, save_backbone, write_model_info
from tests.ijb_release import IJBRelease, write_ijb_release

CFG = SyntheticConfig(image_size=32)
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> IJBRelease:
    return write_ijb_release(tmp_path_factory.mktemp("release") / "IJBC", CFG, subjects=14)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained mbf at 32×32: its embeddings are arbitrary but deterministic, all the protocol needs."""
    torch.manual_seed(0)
    final = tmp_path_factory.mktemp("model") / "final"
    final.mkdir()
    save_backbone(build_backbone("mbf", embedding_size=128, image_size=32).eval(), final / "backbone.safetensors")
    write_model_info(final, backbone="mbf", embedding_size=128, image_size=32, steps=0)
    return final


def _run(capsys, *args: str) -> tuple[int, list[dict], list[str]]:
    code = main([*args, "--device", "cpu", "--batch-size", "16", "--threads", "2"])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.startswith("{")], err.strip().splitlines()


@pytest.fixture(scope="module")
def scored(release: IJBRelease, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    features = tmp_path_factory.mktemp("features") / "ijbc.features"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # module scope: capsys is per test
        code = main([str(model_dir), "--ijb", str(release.root.parent), "--features", str(features),
                     "--device", "cpu", "--batch-size", "16", "--threads", "2"])
    assert code == 0
    return {"records": [json.loads(line) for line in out.getvalue().splitlines()], "features": features}


# ------------------------------------------------------------------ the float64 reference, written out


def _reference_templates(release: IJBRelease, emb: np.ndarray, flip: np.ndarray | None, names: list[str],
                         norm_weight: bool = True, detector_weight: bool = True) -> dict[int, np.ndarray]:
    row = {n: i for i, n in enumerate(names)}
    out = {}
    for template, images in release.template_images.items():
        by_media: dict[int, list[np.ndarray]] = defaultdict(list)
        for name in images:
            f = emb[row[name]].astype(np.float64) + (flip[row[name]].astype(np.float64) if flip is not None else 0)
            if not norm_weight:
                f = f / np.linalg.norm(f)
            if detector_weight:
                f = f * release.images[name].score
            by_media[release.images[name].media].append(f)
        total = sum(np.mean(fs, axis=0) for fs in by_media.values())
        out[template] = total / np.linalg.norm(total)
    return out


def _reference_tar(scores: np.ndarray, labels: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    genuine, impostor = scores[labels == 1], scores[labels == 0]
    points = [(0.0, 0.0)]  # (FAR, TAR) accepting nothing, then at each distinct score
    for t in np.unique(scores):
        points.append((float(np.mean(impostor >= t)), float(np.mean(genuine >= t))))
    nearest, strict = {}, {}
    for far in FARS:
        best = min(points, key=lambda p: (abs(p[0] - far), -p[1]))
        nearest[str(far)] = best[1]
        strict[str(far)] = max(p[1] for p in points if p[0] <= far)
    return nearest, strict


def _reference_search(gallery: list[int], probes: list[int], feats: dict[int, np.ndarray],
                      subject: dict[int, int]) -> tuple[dict[int, float], dict[float, float | None]]:
    ranks: dict[int, list[int]] = {1: [], 5: [], 10: []}
    mated, non_mated = [], []
    gallery_subjects = {subject[g] for g in gallery}
    for p in probes:
        sims = {g: float(feats[p] @ feats[g]) for g in gallery}
        top = max(sims, key=sims.get)
        if subject[p] in gallery_subjects:
            best_mate = max(s for g, s in sims.items() if subject[g] == subject[p])
            rank = 1 + sum(1 for g, s in sims.items() if subject[g] != subject[p] and s > best_mate)
            for k in ranks:
                ranks[k].append(rank <= k)
            mated.append((subject[top] == subject[p], sims[top]))
        else:
            non_mated.append(sims[top])
    tpir: dict[float, float | None] = {}
    for fpir in (0.01, 0.1):
        if not non_mated:
            tpir[fpir] = None
            continue
        alarms = math.floor(fpir * len(non_mated))
        tau = sorted(non_mated, reverse=True)[alarms] if alarms < len(non_mated) else -math.inf
        tpir[fpir] = float(np.mean([hit and s > tau for hit, s in mated]))
    return {k: float(np.mean(v)) for k, v in ranks.items()}, tpir


def _saved(features: Path) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    _, arrays = read_array_file(features)
    names = bytes(arrays["names"]).decode().split("\n")
    return names, np.asarray(arrays["emb"]), np.asarray(arrays["emb_flip"]) if "emb_flip" in arrays else None


# ------------------------------------------------------------------ the contract and the numbers


def test_one_json_line_per_protocol_with_the_counts_of_the_release(scored: dict, release: IJBRelease) -> None:
    one, many = scored["records"]
    assert one["set"] == "IJBC" and one["protocol"] == "1:1"
    assert one["templates"] == len(release.template_images) and one["pairs"] == len(release.t1)
    assert one["genuine"] == int(release.label.sum())
    keys = ["1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"]
    assert list(one["tar_at_far"]) == keys and list(one["tar_at_far_strict"]) == keys
    assert all(0.0 <= v <= 1.0 for v in [*one["tar_at_far"].values(), *one["tar_at_far_strict"].values()])
    assert many["set"] == "IJBC" and many["protocol"] == "1:N"
    assert many["gallery"] == len(release.gallery1) + len(release.gallery2) and many["probes"] == len(release.probes)
    assert list(many["tpir_at_fpir"]) == ["0.01", "0.1"]


def test_tar_under_both_rules_equals_a_direct_float64_computation(scored: dict, release: IJBRelease) -> None:
    names, emb, flip = _saved(scored["features"])
    feats = _reference_templates(release, emb, flip, names)
    scores = np.array([feats[a] @ feats[b] for a, b in zip(release.t1, release.t2, strict=True)])
    nearest, strict = _reference_tar(scores, release.label)
    one = scored["records"][0]
    assert one["tar_at_far"] == pytest.approx(nearest, abs=1e-12)
    assert one["tar_at_far_strict"] == pytest.approx(strict, abs=1e-12)


def test_rank_k_and_tpir_equal_a_direct_float64_computation(scored: dict, release: IJBRelease) -> None:
    names, emb, flip = _saved(scored["features"])
    feats = _reference_templates(release, emb, flip, names)
    subject = release.template_subject
    ranks, _ = _reference_search(release.gallery1 + release.gallery2, release.probes, feats, subject)
    tpirs = [_reference_search(g, release.probes, feats, subject)[1] for g in (release.gallery1, release.gallery2)]
    many = scored["records"][1]
    assert [many["rank1"], many["rank5"], many["rank10"]] == pytest.approx([ranks[1], ranks[5], ranks[10]], abs=1e-12)
    for fpir in (0.01, 0.1):
        assert many["tpir_at_fpir"][str(fpir)] == pytest.approx((tpirs[0][fpir] + tpirs[1][fpir]) / 2, abs=1e-12)


def test_saved_features_give_identical_numbers_and_each_option_rescores_from_them(
        scored: dict, release: IJBRelease, model_dir: Path, capsys) -> None:
    base = [str(model_dir), "--ijb", str(release.root), "--features", str(scored["features"])]
    code, again, _ = _run(capsys, *base)
    assert code == 0 and [{k: v for k, v in r.items() if k != "extract_s"} for r in again] == \
        [{k: v for k, v in r.items() if k != "extract_s"} for r in scored["records"]]
    names, emb, flip = _saved(scored["features"])
    for flags, kw in ((["--no-flip"], {"flip": None}), (["--no-norm-weight"], {"norm_weight": False}),
                      (["--no-detector-weight"], {"detector_weight": False})):
        code, records, _ = _run(capsys, *base, *flags)
        feats = _reference_templates(release, emb, kw.get("flip", flip) if "flip" in kw else flip, names,
                                     norm_weight=kw.get("norm_weight", True),
                                     detector_weight=kw.get("detector_weight", True))
        scores = np.array([feats[a] @ feats[b] for a, b in zip(release.t1, release.t2, strict=True)])
        assert code == 0 and records[0]["tar_at_far_strict"] == pytest.approx(
            _reference_tar(scores, release.label)[1], abs=1e-12), flags


def test_an_onnx_export_of_the_model_scores_like_the_model(scored: dict, release: IJBRelease, model_dir: Path,
                                                           tmp_path: Path, capsys) -> None:
    from fr_train.export import load_saved_model

    model, _ = load_saved_model(model_dir)
    onnx = export_onnx(model, tmp_path / "model.onnx", image_size=32)
    code, records, _ = _run(capsys, str(onnx), "--ijb", str(release.root), "--features", str(tmp_path / "f"))
    assert code == 0
    _, emb_torch, _ = _saved(scored["features"])
    _, emb_onnx, _ = _saved(tmp_path / "f")
    np.testing.assert_allclose(emb_onnx, emb_torch, rtol=1e-4, atol=1e-4)
    assert records[1]["rank1"] == scored["records"][1]["rank1"]


def test_features_of_another_model_are_refused_and_kept(scored: dict, release: IJBRelease, tmp_path: Path,
                                                       capsys) -> None:
    other = tmp_path / "final"
    other.mkdir()
    torch.manual_seed(1)
    save_backbone(build_backbone("mbf", embedding_size=128, image_size=32).eval(), other / "backbone.safetensors")
    write_model_info(other, backbone="mbf", embedding_size=128, image_size=32, steps=0)
    before = scored["features"].read_bytes()
    code, _, err = _run(capsys, str(other), "--ijb", str(release.root), "--features", str(scored["features"]))
    assert code == 1 and len(err) == 1 and "was extracted by another model" in err[0]
    assert scored["features"].read_bytes() == before


# ------------------------------------------------------------------ bad input: one line, the file, the fix


def _copy(release: IJBRelease, tmp_path: Path) -> Path:
    root = tmp_path / "IJBC"
    shutil.copytree(release.root, root)
    return root


def _edit(path: Path, fn) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


BAD_INPUTS = {
    "missing meta file": (lambda r: (r / "meta" / "ijbc_template_pair_label.txt").unlink(),
                          "ijbc_template_pair_label.txt: missing"),
    "image listed but absent": (lambda r: next((r / "loose_crop").glob("*.png")).unlink(),
                                "listed in the tid/mid file but absent"),
    "landmark line with a wrong field count": (
        lambda r: _edit(r / "meta" / "ijbc_name_5pts_score.txt", lambda ls: [*ls[:3], ls[3].rsplit(" ", 2)[0], *ls[4:]]),
        "ijbc_name_5pts_score.txt: line 4: has 10 fields, want 11 or 12"),
    "landmark line with a non-finite value": (
        lambda r: _edit(r / "meta" / "ijbc_name_5pts_score.txt",
                        lambda ls: [*ls[:1], " ".join([*ls[1].split(" ")[:3], "nan", *ls[1].split(" ")[4:]]), *ls[2:]]),
        "ijbc_name_5pts_score.txt: line 2: has a non-finite value"),
    "pair naming an unknown template": (
        lambda r: _edit(r / "meta" / "ijbc_template_pair_label.txt", lambda ls: [*ls[:5], "999999 101 0", *ls[5:]]),
        "ijbc_template_pair_label.txt: line 6: names template 999999"),
    "gallery template with no images": (
        lambda r: _edit(r / "meta" / "ijbc_1N_gallery_G2.csv", lambda ls: [*ls, "888888,1001,x.jpg,1"]),
        "ijbc_1N_gallery_G2.csv: gallery template 888888 has no images"),
    "probe absent from the templates": (
        lambda r: _edit(r / "meta" / "ijbc_1N_probe_mixed.csv", lambda ls: [*ls, "777777,1001,x.jpg,1"]),
        "ijbc_1N_probe_mixed.csv: probe 777777 has no images"),
    "image without landmarks": (
        lambda r: _edit(r / "meta" / "ijbc_name_5pts_score.txt", lambda ls: ls[1:]),
        "ijbc_name_5pts_score.txt: has no line for image"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_releases_are_one_line_naming_the_file(case: str, release: IJBRelease, model_dir: Path,
                                                    tmp_path: Path, capsys) -> None:
    root = _copy(release, tmp_path)
    damage, says = BAD_INPUTS[case]
    damage(root)
    code, records, err = _run(capsys, str(model_dir), "--ijb", str(root))
    assert code == 1 and not records and len(err) == 1, (case, err)
    assert err[0].startswith("fr_eval: error: ") and says in err[0], (case, err)


def test_an_onnx_model_with_the_wrong_input_shape_is_refused(release: IJBRelease, tmp_path: Path, capsys) -> None:
    class Gray(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :8]

    path = tmp_path / "gray.onnx"
    torch.onnx.export(Gray(), (torch.zeros(1, 1, 112, 112),), str(path), input_names=["input"], dynamo=False)
    code, _, err = _run(capsys, str(path), "--ijb", str(release.root))
    assert code == 1 and len(err) == 1 and "gray.onnx: input 'input'" in err[0] and "[N, 3, S, S]" in err[0]


def test_nothing_to_evaluate_is_a_usage_error(model_dir: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([str(model_dir)])
    assert exc.value.code == 2 and "pass --bin SET.bin and/or --ijb DIR" in capsys.readouterr().err


def test_ijbb_is_read_from_its_meta_names_and_chosen_by_flag_beside_ijbc(release: IJBRelease, model_dir: Path,
                                                                          tmp_path: Path, capsys) -> None:
    shutil.copytree(release.root, tmp_path / "IJBC")
    ijbb = write_ijb_release(tmp_path / "IJBB", CFG, target="IJBB", subjects=6, seed=1)
    code, records, _ = _run(capsys, str(model_dir), "--ijb", str(ijbb.root))
    assert code == 0 and [(r["set"], r["protocol"]) for r in records] == [("IJBB", "1:1"), ("IJBB", "1:N")]
    assert records[1]["gallery"] == len(ijbb.gallery1) + len(ijbb.gallery2)  # S1 ∪ S2
    code, records, err = _run(capsys, str(model_dir), "--ijb", str(tmp_path))
    assert code == 1 and len(err) == 1 and "holds both IJB-B and IJB-C meta files" in err[0] and "--ijb-target" in err[0]
    code, records, _ = _run(capsys, str(model_dir), "--ijb", str(tmp_path), "--ijb-target", "IJBB")
    assert code == 0 and records[0]["set"] == "IJBB" and records[0]["pairs"] == len(ijbb.t1)


def test_a_run_with_eval_ijb_checks_the_release_when_it_starts(release: IJBRelease, tmp_path: Path) -> None:
    """The Trainer calls find_ijb_release on rank 0 before the first step: a misplaced release fails the
    launch (not retried: a DataFormatError is the run's input) instead of the end of a day-long run."""
    from data_pipeline.errors import DataFormatError
    from fr_train.config import ConfigError, build_config
    from fr_train.train.components import find_ijb_release

    assert find_ijb_release(build_config("mbf", "arcface")) is None
    found = find_ijb_release(build_config("mbf", "arcface", overrides=[f"eval.ijb={release.root.parent}"]))
    assert found.target == "IJBC" and found.root == release.root
    with pytest.raises(DataFormatError, match="no such directory"):
        find_ijb_release(build_config("mbf", "arcface", overrides=[f"eval.ijb={tmp_path / 'nowhere'}"]))
    with pytest.raises(ConfigError, match=r"eval\.ijb_target"):
        build_config("mbf", "arcface", overrides=["eval.ijb_target=IJBA"])
