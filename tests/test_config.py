"""The config tree: presets, overrides, and errors that name the key and what is valid."""

from __future__ import annotations

import re

import pytest

from cluster.cli import main
from fr_train.command_line import build_parser, config_from_args
from fr_train.config import METHODS, ConfigError, TrainConfig, build_config, valid_keys
from fr_train.train.schedule import PolySchedule, scaled_lr


def test_every_method_preset_builds_and_sets_the_head():
    for method in METHODS:
        cfg = build_config("r18", method, overrides=["distill.teacher=runs/t/final"] if method == "distill" else [])
        assert cfg.method == method
    assert build_config("r18", "arcface").head.m2 == 0.5
    assert build_config("r18", "cosface").head.m3 == 0.4
    assert build_config("r18", "vpl").head.vpl is True
    assert build_config("r18", "softmax").head.margin == "softmax"


def test_overrides_are_typed_and_win_over_the_preset():
    cfg = build_config("r50", "vpl", overrides=["head.sample_rate=0.1", "head.vpl_start_iter=100",
                                                 "eval.sets=lfw,cfp_fp", "head.vpl=false"])
    assert cfg.head.sample_rate == 0.1 and isinstance(cfg.head.vpl_start_iter, int)
    assert cfg.eval.sets == ["lfw", "cfp_fp"]
    assert cfg.head.vpl is False


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'head.sampel_rate'.*head.sample_rate"):
        build_config("r50", "arcface", overrides=["head.sampel_rate=0.1"])


@pytest.mark.parametrize("override, message", [
    ("head.sample_rate=0", "head.sample_rate: must be in \\(0, 1\\]"),
    ("head.sample_rate=abc", "head.sample_rate: expected a number"),
    ("data.batch_size=1.5", "data.batch_size: expected an integer"),
    ("run.precision=fp8", "run.precision: 'fp8' is not one of"),
    ("run.zero_stage=3", "run.zero_stage: must be 0, 1 or 2"),
    ("head", "not of the form key=value"),
    ("head=1", "'head' is a section"),
])
def test_bad_values_name_the_field_and_the_range(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("r50", "arcface", overrides=[override])


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=inf", r"optimizer\.lr: must be a finite number \(got inf\)"),
    ("optimizer.lr=nan", r"optimizer\.lr: must be a finite number \(got nan\)"),
    ("optimizer.lr=0", r"optimizer\.lr: must be > 0 \(got 0\.0\)"),
    ("optimizer.lr=-0.1", r"optimizer\.lr: must be > 0 \(got -0\.1\)"),
    ("head.s=inf", r"head\.s: must be a finite number \(got inf\)"),
    ("head.s=nan", r"head\.s: must be a finite number \(got nan\)"),
    ("head.s=0", r"head\.s: must be > 0 \(got 0\.0\)"),
    ("optimizer.weight_decay=inf", r"optimizer\.weight_decay: must be a finite number \(got inf\)"),
    ("optimizer.weight_decay=nan", r"optimizer\.weight_decay: must be a finite number \(got nan\)"),
    ("optimizer.weight_decay=-1e-4", r"optimizer\.weight_decay: must be >= 0 \(got -0\.0001\)"),
    ("checkpoint.every_minutes=-5", r"checkpoint\.every_minutes: must be >= 0 \(0: off\) \(got -5\.0\)"),
    ("checkpoint.every_minutes=nan", r"checkpoint\.every_minutes: must be a finite number \(got nan\)"),
    ("metrics.push_interval=inf", r"metrics\.push_interval: must be a finite number \(got inf\)"),
    ("checkpoint.sigterm_grace_s=-inf", r"checkpoint\.sigterm_grace_s: must be a finite number \(got -inf\)"),
    ("metrics.bind=not_an_ip", r"metrics\.bind: must be an IP address such as 127\.0\.0\.1 .* \(got 'not_an_ip'\)"),
    ("metrics.bind=localhost", r"metrics\.bind: must be an IP address"),
    ("run.name=../../x", r"run\.name: must be a plain directory name .*inside run\.storage \(got '\.\./\.\./x'\)"),
    ("run.name=/tmp/elsewhere", r"run\.name: must be a plain directory name"),
    ("run.name=a/b", r"run\.name: must be a plain directory name"),
    ("run.name=..", r"run\.name: must be a plain directory name"),
    ("data.synthetic.num_pairs=4", r"data\.synthetic\.num_pairs: must be even .* >= 10 .*\(got 4\)"),
])
def test_non_finite_out_of_range_and_unsafe_values_are_refused_naming_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("r50", "arcface", overrides=[override])


def test_toml_inf_and_nan_are_refused_like_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[head]\ns = inf\n")
    with pytest.raises(ConfigError, match=r"head\.s: must be a finite number \(got inf\)"):
        build_config("r50", "arcface", config_file=path)


def test_checkpoint_every_minutes_zero_still_means_off():
    assert build_config("r50", "arcface", overrides=["checkpoint.every_minutes=0"]).checkpoint.every_minutes == 0


def test_resume_takes_auto_never_or_an_existing_directory_made_absolute(tmp_path, monkeypatch):
    for mode in ("auto", "never"):
        assert build_config("r50", "arcface", overrides=[f"checkpoint.resume={mode}"]).checkpoint.resume == mode
    with pytest.raises(ConfigError, match=r"checkpoint\.resume: is neither auto, never nor an existing checkpoint "
                                          r"directory; pass auto .*never .*checkpoints/step_N \(got '.*garbage'\)"):
        build_config("r50", "arcface", overrides=["checkpoint.resume=garbage"])
    step = tmp_path / "run" / "checkpoints" / "step_000000010"
    step.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "run")
    # Relative to where fr_train runs; stored absolute because the workers run in another directory.
    cfg = build_config("r50", "arcface", overrides=["checkpoint.resume=checkpoints/step_000000010"])
    assert cfg.checkpoint.resume == str(step)


def test_plain_run_names_and_ip_addresses_are_accepted():
    cfg = build_config("r50", "arcface", overrides=["run.name=ms1m-r50.v2_final", "metrics.bind=0.0.0.0"])
    assert (cfg.run.name, cfg.metrics.bind) == ("ms1m-r50.v2_final", "0.0.0.0")
    assert build_config("r50", "arcface", overrides=["metrics.bind=::"]).metrics.bind == "::"


def test_distillation_needs_a_teacher_and_a_weight():
    with pytest.raises(ConfigError, match=r"distill\.teacher: is required by the distillation weights"):
        build_config("mbf", "distill")
    with pytest.raises(ConfigError, match=r"distill\.teacher: is set but every distillation weight is 0"):
        build_config("mbf", "arcface", overrides=["distill.teacher=runs/t/final"])
    cfg = build_config("mbf", "distill", overrides=["distill.teacher=runs/t/final"])
    assert (cfg.distill.ekd_pos_weight, cfg.distill.ekd_neg_weight, cfg.head.m2) == (0.02, 0.01, 0.5)


def test_unknown_method_and_backbone_list_the_choices():
    with pytest.raises(ConfigError, match=r"unknown method 'arcfce'.*arcface"):
        build_config("r50", "arcfce")
    with pytest.raises(ConfigError, match=r"backbone.name: must be one of .*r100"):
        build_config("r1000", "arcface")


def test_toml_file_applies_and_typos_in_it_are_errors(tmp_path):
    good = tmp_path / "run.toml"
    good.write_text('[head]\nsample_rate = 0.3\n[optimizer]\nlr = 0.2\n')
    cfg = build_config("r50", "cosface", config_file=good)
    assert cfg.head.sample_rate == 0.3 and cfg.optimizer.lr == 0.2 and cfg.head.m3 == 0.4
    bad = tmp_path / "bad.toml"
    bad.write_text('[optimiser]\nlr = 0.2\n')
    with pytest.raises(ConfigError, match=f"{bad}: unknown config key 'optimiser.lr'"):
        build_config("r50", "cosface", config_file=bad)


def test_resolved_config_round_trips_through_its_dict():
    cfg = build_config("r100", "vpl", overrides=["head.sample_rate=0.2", "eval.sets=lfw"])
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_cli_flags_map_onto_the_tree_and_set_wins():
    args = build_parser().parse_args(["r18", "vpl", "--data", "/d", "--num-workers", "4", "--max-steps", "7",
                                      "--set", "schedule.max_steps=9", "--name", "x", "--resume", "never"])
    cfg = config_from_args(args)
    assert (cfg.data.path, cfg.run.num_workers, cfg.schedule.max_steps, cfg.run.name) == ("/d", 4, 9, "x")
    assert cfg.checkpoint.resume == "never"


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(["r18", "arcface", "--set", "head.nope=1"]) == 2
    assert "config error: unknown config key 'head.nope'" in capsys.readouterr().err


def test_fr_train_list_prints_backbones_methods_and_keys(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("r18", "r100", "mbf", *METHODS):
        assert f"  {name}" in out
    assert all(k in out for k in valid_keys())


def test_lr_schedule_warms_up_then_decays_to_zero():
    s = PolySchedule(base_lr=0.4, total_steps=10, warmup_steps=2, power=1.0)
    assert [round(s.lr(i), 6) for i in range(11)] == [0.2, 0.4, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05, 0.0]
    assert scaled_lr(0.1, 256, 1024) == pytest.approx(0.025)


@pytest.mark.parametrize("raw", ["lfw,cfp_fp", "[lfw, cfp_fp]", '["lfw", "cfp_fp"]', " [ lfw,cfp_fp ] "])
def test_a_list_key_takes_commas_or_toml_brackets(raw: str) -> None:
    assert build_config("r18", "arcface", overrides=[f"eval.sets={raw}"]).eval.sets == ["lfw", "cfp_fp"]


@pytest.mark.parametrize(("raw", "problem"), [
    ("[1,2]", "eval.sets: expected a string, got 1"),  # was ["[1", "2]"]
    ("[lfw", "eval.sets: '[lfw' has an unmatched bracket"),
    ("[[lfw]]", "eval.sets: '[[lfw]]' is not a list of values"),
])
def test_a_malformed_list_is_refused_naming_the_key(raw: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        build_config("r18", "arcface", overrides=[f"eval.sets={raw}"])


def test_one_image_per_rank_is_refused_unless_batchnorm_is_frozen() -> None:
    """torch's "Expected more than 1 value per channel when training" came from a worker, naming no key."""
    with pytest.raises(ConfigError, match=r"data.batch_size: must be >= 2 images per rank.*backbone.freeze_bn=true "
                                          r".*\(got 1\)"):
        build_config("mbf", "arcface", overrides=["data.batch_size=1"])
    assert build_config("mbf", "arcface", overrides=["data.batch_size=1", "backbone.freeze_bn=true"]).data.batch_size == 1


def test_integers_are_kept_exactly_and_inexact_ones_refused() -> None:
    """Issue 26: 99999999999999999999999 became 99999999999999991611392 through a float."""
    assert build_config("mbf", "arcface", overrides=["data.batch_size=9007199254740993"]).data.batch_size == \
        9007199254740993
    assert build_config("mbf", "arcface", overrides=["schedule.max_steps=1e3"]).schedule.max_steps == 1000
    with pytest.raises(ConfigError, match=r"schedule\.max_steps: expected an integer"):
        build_config("mbf", "arcface", overrides=["schedule.max_steps=1e17"])  # not exact as a float


def test_an_empty_data_path_is_refused_not_taken_for_the_synthetic_default() -> None:
    """`--data "$UNSET"` trained on the synthetic default; `none` still asks for it."""
    with pytest.raises(ConfigError, match=r"data\.path: is empty: pass a dataset directory"):
        config_from_args(build_parser().parse_args(["mbf", "arcface", "--data", ""]))
    assert build_config("mbf", "arcface", overrides=["data.path=none"]).data.path is None


def test_a_config_file_that_is_not_utf8_is_one_config_error(tmp_path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[run]\nname = \"caf\xe9\"\n")
    with pytest.raises(ConfigError, match=r"cannot read config file .*latin1\.toml"):
        build_config("mbf", "arcface", config_file=path)
