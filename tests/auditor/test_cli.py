"""The command line: commands listed, exit codes mapped, eval measuring planted backdoors."""

from __future__ import annotations

import json

import pytest

from auditor.cli import cli, run
from auditor.zoo.build import CONFIG_PATH, ZOO, checkpoint_path


def test_help_lists_only_working_commands(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    assert set(cli.commands) == {"scan", "eval", "repair", "export", "bench", "demo"}
    for name in cli.commands:
        assert name in out
    assert run(["--version"]) == 0
    assert "clip-audit, version" in capsys.readouterr().out


def test_eval_json_measures_the_planted_backdoor(test_data, capsys):
    attack = ZOO["patch-random"].attack
    assert attack is not None
    code = run(
        [
            "eval",
            str(checkpoint_path("patch-random")),
            str(test_data),
            "--arch",
            str(CONFIG_PATH),
            "--attack",
            attack.spec(),
            "--format",
            "json",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["images"] == 240 and result["attacked_images"] == 220
    assert result["target"] == "banana"
    assert result["clean_accuracy"] >= 0.8
    assert result["attack_success_rate"] >= 0.9


def test_eval_reads_options_from_environment(test_data, capsys, monkeypatch):
    monkeypatch.setenv("CLIP_AUDIT_ARCH", str(CONFIG_PATH))
    monkeypatch.setenv("CLIP_AUDIT_FORMAT", "json")
    assert run(["eval", str(checkpoint_path("clean")), str(test_data)]) == 0
    assert json.loads(capsys.readouterr().out)["attack_success_rate"] is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attack", "sticker:size=1"], "unknown kind"),
        (["--attack", "patch:size=0.1,target=zebra"], "not a class"),
        (["--attack", "patch:size=0.1"], "needs target"),
        (["--no-such-option"], "No such option"),
        (["--format", "yaml"], "Invalid value"),
    ],
)
def test_usage_errors_exit_2(test_data, capsys, extra, message):
    code = run(["eval", str(checkpoint_path("clean")), str(test_data), "--arch", str(CONFIG_PATH), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def test_missing_paths_and_arch_exit_2(test_data, tmp_path, capsys):
    assert run(["eval", str(tmp_path / "none.pt"), str(test_data), "--arch", str(CONFIG_PATH)]) == 2
    assert (
        run(["eval", str(checkpoint_path("clean")), str(tmp_path / "none"), "--arch", str(CONFIG_PATH)]) == 2
    )
    assert run(["eval", str(checkpoint_path("clean")), str(test_data)]) == 2  # --arch missing
    assert run(["eval", str(checkpoint_path("clean")), str(test_data), "--arch", "NoSuchNet"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_internal_errors_exit_4_without_traceback(test_data, capsys, monkeypatch):
    import auditor.evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(auditor.evaluate, "evaluate", broken)
    code = run(["eval", str(checkpoint_path("clean")), str(test_data), "--arch", str(CONFIG_PATH)])
    err = capsys.readouterr().err
    assert code == 4
    assert "internal error: RuntimeError: boom" in err and "Traceback" not in err


def test_demo_without_font_is_environment_error(monkeypatch, capsys):
    import auditor.zoo.scenes as scenes

    monkeypatch.setattr(scenes, "EMOJI_FONT", scenes.EMOJI_FONT.with_name("missing.ttf"))
    assert run(["demo"]) == 3
    assert "fonts-noto-color-emoji" in capsys.readouterr().err
