"""Config parsing and errors, and the launcher-environment detection (no processes needed)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from engine.config import Config, ConfigError, config_to_dict, dump_config, load_config
from engine.config_reference import reference, reference_table
from engine.errors import LaunchError
from engine.runtime.distributed import detect_launch_env, first_slurm_host, select_backend


def write(tmp_path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_shipped_configs_load():
    shipped = sorted(Path("configs").glob("*.yaml"))
    assert len(shipped) >= 6
    for path in shipped:
        assert isinstance(load_config(str(path)), Config), path
    segmentation = load_config("configs/segmentation.yaml")
    assert (segmentation.task, segmentation.model.name, segmentation.train.best_metric) == (
        "segmentation", "small_segnet", "val_miou")
    voc = load_config("configs/voc_deeplabv3_resnet50.yaml")
    assert (voc.task, voc.data.name, voc.model.aux_loss_weight, voc.data.val_batch_size) == ("segmentation", "voc", 0.5, 1)
    default = load_config("configs/default.yaml")
    assert (default.data.name, default.model.name, default.syncbn.enabled) == ("synthetic", "small_cnn", True)
    resnet50 = load_config("configs/imagenet_resnet50.yaml", world_size=8)
    assert (resnet50.data.batch_size, resnet50.train.lr_scaling, resnet50.train.warmup_epochs) == (32, "linear", 5)


def test_fixed_key_names_exist():
    cfg = load_config(None)
    for dotted in ("model.name", "model.num_classes", "data.name", "data.root", "data.batch_size",
                   "data.num_workers", "train.epochs", "train.lr", "train.seed", "syncbn.enabled", "output_dir"):
        node = cfg
        for part in dotted.split("."):
            node = getattr(node, part)


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = write(tmp_path, "train: {epochs: 3}\n")
    cfg = load_config(path, ["train.epochs=7", "data.batch_size=16", "train.lr=1e-2", "syncbn.enabled=false",
                             "train.step_milestones=[1, 2]", "model.kwargs={width: 8}", "output_dir=/tmp/x"])
    assert cfg.train.epochs == 7 and cfg.data.batch_size == 16 and cfg.train.lr == 0.01
    assert cfg.syncbn.enabled is False and cfg.train.step_milestones == [1, 2]
    assert cfg.model.kwargs == {"width": 8} and cfg.output_dir == "/tmp/x"


def test_weight_decay_auto_is_each_optimizers_usual_value_and_an_explicit_one_wins():
    decay = {o: load_config(None, [f"train.optimizer={o}"]).train.weight_decay for o in ("sgd", "adamw")}
    assert decay == {"sgd": 5e-4, "adamw": 0.05}
    assert load_config(None, ["train.optimizer=adamw", "train.weight_decay=0"]).train.weight_decay == 0.0


def test_int_accepted_for_float_and_later_override_wins():
    cfg = load_config(None, ["train.lr=1", "train.lr=2"])
    assert cfg.train.lr == 2.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.epoch=3"], "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
        (["trian.epochs=3"], "unknown config key 'trian' (did you mean 'train'?)"),
        (["data.batch_size=abc"], "data.batch_size: expected int, got str"),
        (["data.batch_size=0"], "data.batch_size: must be >= 1"),
        (["data.batch_size=-4"], "data.batch_size: must be >= 1"),
        (["train.lr=0"], "train.lr: must be > 0"),
        (["train.agree_every_steps=0"], "train.agree_every_steps: must be >= 1"),
        (["syncbn.enabled=maybe"], "syncbn.enabled: expected bool"),
        (["train.optimizer=adam"], "train.optimizer: 'adam' is not one of sgd, adamw"),
        (["train.epochs"], "malformed override 'train.epochs'"),
        (["=3"], "malformed override"),
        (["train.epochs=[1"], "not valid YAML"),
        (["syncbn.enabled=false", "data.batch_size=1"], "data.batch_size: BatchNorm needs >= 2 samples"),
        (["syncbn.enabled=true", "syncbn.virtual_splits=2"], "syncbn.virtual_splits: ghost BatchNorm"),
        (["syncbn.enabled=false", "syncbn.virtual_splits=3"], "must divide data.batch_size"),
        (["train.epochs=3.5"], "train.epochs: expected int, got float"),
        (["train=5"], "train: expected a mapping"),
        (["train.eval_only=true", "train.resume=none"], "train.eval_only: needs a checkpoint"),
        (["task=multilabel"], "task: unknown task 'multilabel'; registered: classification, contrastive, detection, "
                                  "segmentation"),
        (["train.best_metric=val_miou"], "train.best_metric: val_miou is not a metric of task classification (it has "
                                         "val_acc1, val_acc5, val_acc1_ema, val_acc5_ema)"),
        (["train.weight_decay=-1"], "train.weight_decay: must be >= 0 or auto"),
    ],
)
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"configs/defualt.yaml \(did you mean configs/default.yaml\?\)"):
        load_config("configs/defualt.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml line \d+ is not valid YAML"):
        load_config(write(tmp_path, "train:\n  epochs: [1\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="weights.yaml"):
        load_config(str(binary))


def test_yaml_python_tags_are_refused(tmp_path, capfd):
    path = write(tmp_path, "output_dir: !!python/object/apply:os.system ['echo PWNED']\n")
    with pytest.raises(ConfigError):
        load_config(path)
    assert "PWNED" not in capfd.readouterr().out


def test_round_trip_dump_and_plain_data(tmp_path):
    cfg = load_config("configs/imagenet_resnet50.yaml", ["train.epochs=2"])
    out = tmp_path / "config.yaml"
    dump_config(cfg, str(out))
    assert load_config(str(out)) == cfg
    assert yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))) == config_to_dict(cfg)  # plain data only
    assert yaml.safe_load(out.read_text())["train"]["epochs"] == 2


def test_launch_env_detection():
    single = detect_launch_env(None, {})
    assert (single.rank, single.world_size, single.launcher) == (0, 1, "single")
    legacy_arg = detect_launch_env(3, {})
    assert legacy_arg.local_rank == 3
    torchrun = detect_launch_env(None, {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                                        "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.local_world_size) == (5, 8, 1, 4)
    assert (torchrun.master_addr, torchrun.master_port, torchrun.launcher) == ("10.0.0.1", 29500, "torchrun")
    legacy = detect_launch_env(2, {"RANK": "2", "WORLD_SIZE": "4"})  # launch without LOCAL_RANK in env
    assert legacy.local_rank == 2
    slurm = detect_launch_env(None, {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                                     "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "1234",
                                     "SLURM_TASKS_PER_NODE": "8(x2)"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.local_world_size) == (9, 16, 1, 8)
    assert (slurm.master_addr, slurm.master_port, slurm.launcher) == ("gpu003", 15000 + 1234, "slurm")
    with pytest.raises(LaunchError, match="WORLD_SIZE"):
        detect_launch_env(None, {"RANK": "0", "WORLD_SIZE": "two"})


def test_slurm_nodelist_parsing_and_backend_choice():
    assert first_slurm_host("node17") == "node17"
    assert first_slurm_host("gpu[010-012,020],cpu1") == "gpu010"
    assert first_slurm_host("a-b[7]") == "a-b7"
    assert select_backend("auto", cuda_available=False) == "gloo"
    assert select_backend("auto", cuda_available=True) == "nccl"
    with pytest.raises(ConfigError, match="dist.backend: nccl needs CUDA"):
        select_backend("nccl", cuda_available=False)


def _leaves(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_one_source_of_defaults_readme_schema_and_default_yaml_agree():
    """docs/config.md's table is the schema's (keys, defaults, meanings) without the test hooks, which docs/testing.md
    lists; the shipped default says only what differs from the schema."""
    docs = Path(__file__).resolve().parent.parent / "docs"
    table = reference_table()
    assert table in (docs / "config.md").read_text(encoding="utf-8"), "docs/config.md's table differs; paste:\n" + table
    assert "debug." not in table and reference_table(("debug",)) in (docs / "testing.md").read_text(encoding="utf-8")
    schema = _leaves(config_to_dict(Config()))
    with open("configs/default.yaml", encoding="utf-8") as f:
        shipped = _leaves(yaml.safe_load(f))
    same = [key for key, value in shipped.items() if schema[key] == value]
    assert same == [], f"configs/default.yaml repeats schema defaults: {same}"


def test_help_lists_every_key_with_its_default_without_importing_torch():
    import subprocess
    import sys

    from tests.helpers.jobs import REPO_ROOT, TRAIN_SCRIPT

    done = subprocess.run([sys.executable, "-X", "importtime", TRAIN_SCRIPT, "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for key, _default, meaning in reference():
        assert f"{key}=" in done.stdout and meaning.replace("**", "") in done.stdout, key
    assert "train.epochs=10" in done.stdout and "README.md" in done.stdout and "debug." not in done.stdout
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported, "--help imported torch (seconds) before answering"


def test_norm_batch_size_delivers_its_group_or_split_and_names_the_nearest_valid_values():
    from engine.config import norm_batch_choices

    assert norm_batch_choices(8, 4) == [2, 4, 8, 16, 32]
    assert norm_batch_choices(2, 4, smallest=1) == [1, 2, 4, 8]  # segmentation: one image per statistic
    cases = {  # N -> (enabled, group_size, virtual_splits), batch 8 per process on 4 processes
        16: (True, 2, 1), 32: (True, 0, 1), 8: (False, 0, 1), 4: (False, 0, 2), 2: (False, 0, 4),
    }
    for n, want in cases.items():
        cfg = load_config(None, ["data.batch_size=8", f"syncbn.norm_batch_size={n}"], world_size=4)
        assert (cfg.syncbn.enabled, cfg.syncbn.group_size, cfg.syncbn.virtual_splits) == want, n
    with pytest.raises(ConfigError, match=r"syncbn.norm_batch_size: 12 cannot be delivered .* nearest valid: 8 or 16"):
        load_config(None, ["data.batch_size=8", "syncbn.norm_batch_size=12"], world_size=4)
    with pytest.raises(ConfigError, match=r"nearest valid: 32$"):
        load_config(None, ["data.batch_size=8", "syncbn.norm_batch_size=64"], world_size=4)
    assert load_config(None, ["syncbn.norm_batch_size=0"], world_size=4).syncbn.enabled  # off: the keys as set


def test_print_config_shows_the_resolved_config_without_running(tmp_path) -> None:
    import subprocess
    import sys

    from engine.config import config_text
    from tests.helpers.jobs import REPO_ROOT, TRAIN_SCRIPT

    args = ["--config", "configs/cifar10_resnet18.yaml", "train.epochs=3", f"output_dir={tmp_path / 'run'}"]
    done = subprocess.run([sys.executable, TRAIN_SCRIPT, "--print-config", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == config_text(load_config(args[1], args[2:]))
    assert yaml.safe_load(done.stdout)["train"]["epochs"] == 3 and not (tmp_path / "run").exists()
