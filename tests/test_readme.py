"""The README's quickstart is what CI runs: exactly two commands, the second in .ci/run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
    cmds = quickstart_commands()
    assert len(cmds) == 2
    train, test = cmds
    assert "python -m msc_dist.train" in train and "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines()


def test_configuration_reference_lists_every_key():
    import dataclasses

    from msc_dist.embed.config import EmbedConfig
    from msc_dist.evaluate.config import EvalConfig
    from msc_dist.score.config import ScoreConfig
    from msc_dist.train.config import TrainConfig

    text = (ROOT / "README.md").read_text()
    ref = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    for cls in (TrainConfig, EmbedConfig, ScoreConfig, EvalConfig):
        for f in dataclasses.fields(cls):
            assert f"`--{f.name.replace('_', '-')}` / `{f.name}`" in ref, (cls.__name__, f.name)


def test_every_results_config_loads_and_no_result_file_names_a_machine_path():
    """infra/results/quality: each YAML is a valid `bench quality` config whose data exists beside
    the checkout; no script, config or README there holds an absolute path of a development machine."""
    import re

    from msc_dist.bench.config import BENCHES
    from msc_dist.config import from_dict, load_yaml

    root = Path(__file__).resolve().parents[1]
    folder = root / "infra" / "results" / "quality"
    cls = BENCHES["quality"][0]
    configs = sorted(folder.rglob("*.yaml"))  # maps/ too
    assert configs
    for p in configs:
        cfg = from_dict(cls, load_yaml(p), source=str(p))
        assert cfg.data and not Path(cfg.data).is_absolute(), (p, cfg.data)
    machine = re.compile(r"(?<![\w.])/(work|root|home|tmp|Users)/")
    for p in sorted(folder.rglob("*")):
        if p.suffix in (".sh", ".yaml", ".py", ".md"):
            assert not machine.search(p.read_text()), p
