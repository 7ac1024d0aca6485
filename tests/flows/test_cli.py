"""The CLI only parses: user errors print one line, bugs keep their traceback, `-S` reaches the flow or is refused."""

import pytest
import yaml

import flows.cli as cli
from components.config import ParamsError, ProjectError, load_params
from tests.conftest import ROOT, git_dvc_repo


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_a_bug_keeps_its_traceback(in_repo, monkeypatch):
    def buggy(args, params):
        return {}["missing"]

    monkeypatch.setitem(cli.COMMANDS, "manifest", buggy)
    with pytest.raises(KeyError, match="missing"):
        cli.main(["manifest"])


def test_a_user_error_is_one_line_and_exit_1(in_repo, monkeypatch, capsys):
    def refuses(args, params):
        raise ProjectError("run `braintumor register` first")

    monkeypatch.setitem(cli.COMMANDS, "manifest", refuses)
    assert cli.main(["manifest"]) == 1
    err = capsys.readouterr().err
    assert "braintumor manifest: error: run `braintumor register` first" in err and "Traceback" not in err
    with pytest.raises(ProjectError):  # -v shows the traceback
        cli.main(["-v", "manifest"])


def test_s_on_flow_train_reaches_the_flow(in_repo, monkeypatch):
    import flows.training

    seen = {}
    monkeypatch.setattr(flows.training, "run_with_runner",
                        lambda path, overrides, promote, params: seen.update(path=path, overrides=overrides) or {})
    assert cli.main(["-S", "models.resnet50.epochs=2", "flow", "train"]) == 0
    assert seen == {"path": "params.yaml", "overrides": ["models.resnet50.epochs=2"]}


@pytest.mark.parametrize("command", [["flow", "serve"], ["flow", "predict", "data/incoming/x"]])
def test_s_on_other_flow_commands_is_refused_with_the_reason(in_repo, capsys, command):
    assert cli.main(["-S", "seed=1", *command]) == 1
    assert "does not take overrides" in capsys.readouterr().err


def test_a_misspelt_section_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text() + "\ntrian:\n  epochs: 3\n")
    with pytest.raises(ParamsError, match=rf"(?s){path}.*trian"):
        load_params(path)


def test_one_flow_start_parses_params_once(prefect_harness, tmp_path, monkeypatch):
    """`braintumor -S ... flow train` parses params.yaml (with the overrides) once; the runner choice, the lock, the
    tracking set-up and the stages' device slots all use that one typed config, and the overrides still reach the
    file (for DVC) under the lock."""
    import sys

    import components.config as config
    import flows.training as training

    repo = git_dvc_repo(tmp_path / "repo", {"params.yaml": (ROOT / "params.yaml").read_text(),
                                            "dvc.yaml": "stages: {}\n"})
    monkeypatch.chdir(repo)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    parses, seen = [], {}
    real = config.load_params

    def counted(*args, **kwargs):
        parses.append(args)
        return real(*args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "load_params", None) is real:
            monkeypatch.setattr(module, "load_params", counted)
    monkeypatch.setattr(training, "run_generations",
                        lambda params, root, env, timings: seen.update(params=params) or ([], []))
    assert cli.main(["-S", "models.resnet50.epochs=2", "flow", "train"]) == 0
    assert len(parses) == 1, f"params.yaml parsed {len(parses)} times on one flow start"
    assert seen["params"].model("resnet50").epochs == 2
    assert yaml.safe_load((repo / "params.yaml").read_text())["models"]["resnet50"]["epochs"] == 2
