"""The ``prunekit`` command end to end: real processes, real files, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import prunekit
from prunekit.cli import main
from prunekit.tool.digits import DigitsCNN

ROOT = Path(__file__).resolve().parents[2]
FACTORY = "prunekit.tool:DigitsCNN"
RECIPE = """\
input_shape: [1, 1, 8, 8]
ignore: [classifier.3]
stages:
  - {type: unstructured, sparsity: 0.8, schedule: {steps: 3}}
"""


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "prunekit.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    file = tmp_path / "recipe.yaml"
    file.write_text(RECIPE)
    return file


def test_prune_end_to_end_in_a_process(tmp_path, recipe):
    out = tmp_path / "out"
    done = _cli("prune", FACTORY, "--recipe", str(recipe), "--out", str(out), "-q")
    assert done.returncode == 0, done.stderr
    names = {p.name for p in out.iterdir()}
    assert {"weights.safetensors", "structure.json", "recipe.yaml", "run.json", "report.md",
            "report.json", "sparsity_per_layer.png"} <= names
    assert _is_png(out / "sparsity_per_layer.png")
    model = prunekit.load(DigitsCNN, out)
    assert float((model.features[3].weight == 0).float().mean()) == pytest.approx(0.8, abs=0.01)
    assert int((model.classifier[3].weight == 0).sum()) == 0  # ignored
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["after"]["nonzero"] < report["models"]["before"]["nonzero"]
    assert "| layer | type | shape |" in (out / "report.md").read_text()


def _run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_user_mistake_in_a_process_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [{type: unstructured, sparsty: 0.5}]\n")
    done = _cli("prune", FACTORY, "--recipe", str(bad), "--out", str(tmp_path / "o"))
    assert done.returncode == 2
    assert done.stderr == (
        "prunekit prune: error: recipe.stages[0]: unknown key 'sparsty'; valid keys: block, "
        "ignore, layers, schedule, sparsity, type, zeros_per_block\n")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["prune", "nosuch.module:f", "--recipe", "{recipe}", "--out", "{out}"],
     "prunekit prune: error: model 'nosuch.module:f': cannot import module 'nosuch.module'"),
    (["prune", "prunekit.tool:Nope", "--recipe", "{recipe}", "--out", "{out}"],
     "prunekit prune: error: model 'prunekit.tool:Nope': module 'prunekit.tool' has no "
     "attribute 'Nope'"),
    (["prune", "prunekit.tool", "--recipe", "{recipe}", "--out", "{out}"],
     "prunekit prune: error: model 'prunekit.tool': expected package.module:factory or a .pt2"),
    (["prune", "{tmp}/missing.pt2", "--recipe", "{recipe}", "--out", "{out}"],
     "prunekit prune: error: model '{tmp}/missing.pt2': no such file"),
    (["prune", "{recipe}.pt2", "--recipe", "{recipe}", "--out", "{out}"],
     "prunekit prune: error: model '{recipe}.pt2': not a torch.export program"),
    (["prune", FACTORY, "--recipe", "{tmp}/none.yaml", "--out", "{out}"],
     "prunekit prune: error: recipe '{tmp}/none.yaml': cannot read it"),
    (["prune", FACTORY, "--weights", "{tmp}/w.safetensors", "--recipe", "{recipe}", "--out",
      "{out}"], "prunekit prune: error: weights '{tmp}/w.safetensors': no such file"),
    (["report", "{tmp}"], "prunekit report: error: report: folder '{tmp}' holds neither"),
    (["prune", FACTORY, "--recipe", "{importance}", "--out", "{out}"],
     "prunekit prune: error: recipe.stages[1].importance: expected one of ["),
    (["bench"], "prunekit bench: error: bench: name a benchmark or pass --list; available:"),
])
def test_user_mistakes_exit_2_with_one_line(tmp_path, recipe, capsys, monkeypatch, args, message):
    monkeypatch.chdir(ROOT)
    (tmp_path / "recipe.yaml.pt2").write_text("not a zip")
    importance = tmp_path / "importance.yaml"
    importance.write_text("input_shape: [1, 1, 8, 8]\nstages: [{type: unstructured, sparsity: "
                          "0.5}, {type: structured, ratio: 0.5, importance: l7}]\n")
    fill = {"recipe": str(recipe), "out": str(tmp_path / "o"), "tmp": str(tmp_path),
            "importance": str(importance)}
    code, out, err = _run_main(capsys, *[a.format(**fill) for a in args])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(message.format(**fill)), err
    assert not (tmp_path / "o").exists()


def test_existing_out_needs_overwrite(tmp_path, recipe, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run_main(capsys, "prune", FACTORY, "--recipe", str(recipe), "--out", str(out))
    assert code == 2 and "already exists; pass --overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, _ = _run_main(capsys, "prune", FACTORY, "--recipe", str(recipe), "--out", str(out),
                           "--overwrite", "-q")
    assert code == 0 and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]


def test_weights_and_calibration_are_checked(tmp_path, recipe, capsys):
    weights = tmp_path / "w.safetensors"
    save_file({"bogus": torch.ones(2)}, str(weights))
    out = str(tmp_path / "o")
    code, _, err = _run_main(capsys, "prune", FACTORY, "--weights", str(weights), "--recipe",
                             str(recipe), "--out", out)
    assert code == 2 and "do not fit the model (Error(s) in loading state_dict" in err
    save_file({"inputs": torch.randn(4, 3, 5)}, str(tmp_path / "c.safetensors"))
    recipe.write_text(f"calibration: {{file: {tmp_path / 'c.safetensors'}, batches: 2}}\n"
                      "stages: [{type: unstructured, sparsity: 0.5}]\n")
    code, _, err = _run_main(capsys, "prune", FACTORY, "--recipe", str(recipe), "--out", out)
    assert code == 2
    assert "calibration batch of shape [[1, 3, 5]] does not fit the model" in err
    assert not Path(out).exists()


def test_weights_file_is_loaded(tmp_path, recipe, capsys):
    torch.manual_seed(1)
    trained = DigitsCNN()
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    out = tmp_path / "o"
    code, _, _ = _run_main(capsys, "prune", FACTORY, "--weights", str(tmp_path / "w.safetensors"),
                           "--recipe", str(recipe), "--out", str(out), "-q")
    assert code == 0
    loaded = prunekit.load(DigitsCNN, out)
    assert torch.equal(loaded.classifier[3].weight, trained.classifier[3].weight)


def test_exported_program_is_pruned_and_re_exported(tmp_path, recipe, capsys):
    program = torch.export.export(DigitsCNN().eval(), (torch.randn(1, 1, 8, 8),))
    torch.export.save(program, tmp_path / "m.pt2")
    recipe.write_text("stages: [{type: unstructured, sparsity: 0.5, layers: [Conv2d]}]\n")
    out = tmp_path / "o"
    code, _, err = _run_main(capsys, "prune", str(tmp_path / "m.pt2"), "--recipe", str(recipe),
                             "--out", str(out), "-q")
    assert code == 0, err
    pruned = torch.export.load(out / "model.pt2").module()
    conv = pruned.get_submodule("features.0").weight
    assert float((conv == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    assert int((pruned.get_submodule("classifier.1").weight == 0).sum()) == 0
    code, text, _ = _run_main(capsys, "report", str(out))
    assert code == 0 and "features.0" in text


def test_report_of_a_model_and_of_a_result_folder(tmp_path, recipe, capsys):
    code, text, err = _run_main(capsys, "report", FACTORY, "--input-shape", "1,1,8,8",
                                "--out", str(tmp_path / "rep"))
    assert code == 0, err
    assert "classifier.1" in text and "65.54k" in text
    assert _is_png(tmp_path / "rep" / "sparsity_per_layer.png")
    code, _, err = _run_main(capsys, "report", FACTORY)
    assert code == 2 and "needs --input-shape (e.g. 1,3,32,32)" in err
    code, _, err = _run_main(capsys, "report", FACTORY, "--input-shape", "1,3,8,8")
    assert code == 2 and "--input-shape of shape [[1, 3, 8, 8]] does not fit the model" in err


@pytest.mark.parametrize("command", ["demo", "prune", "report", "bench"])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0
    assert "examples:" in text and "--quiet" in text and "--seed" in text and "--threads" in text


def test_bad_option_values_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["report", FACTORY, "--threads", "0"])
    assert info.value.code == 2
    assert "expected a positive integer, got '0'" in capsys.readouterr().err


def test_bench_lists_and_refuses_unknown_names(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, _, err = _run_main(capsys, "bench", "no_such_bench")
    assert code == 2 and "bench: no benchmark 'no_such_bench'; available:" in err
    code, text, _ = _run_main(capsys, "bench", "--list")
    assert code == 0 and "_common" not in text


def test_demo_fast(tmp_path, capsys):
    folder = tmp_path / "demo"
    code, text, err = _run_main(capsys, "demo", "--fast", "--out", str(folder))
    assert code == 0, err
    assert "dense" in text and "unstructured 90%" in text and "structured 50%" in text
    for png in ("accuracy_vs_sparsity.png", "sparsity_per_layer.png"):
        assert _is_png(folder / png)
    models = json.loads((folder / "report.json").read_text())["models"]
    assert models["unstructured 90%"]["nonzero"] < 0.15 * models["dense"]["params"]
    assert models["structured 50%"]["macs"] < 0.4 * models["dense"]["macs"]
    model = prunekit.load(DigitsCNN, folder / "checkpoints" / "unstructured")
    assert float((model.classifier[1].weight == 0).float().mean()) == pytest.approx(0.9, abs=0.01)
    slim = prunekit.load(DigitsCNN, folder / "checkpoints" / "structured")
    assert slim.features[0].out_channels == 16
    code, text, _ = _run_main(capsys, "report", str(folder), "--out", str(tmp_path / "gallery"))
    assert code == 0 and "layers of structured 50%" in text
    assert _is_png(tmp_path / "gallery" / "sparsity_per_layer.png")
    code, text, _ = _run_main(capsys, "demo", "--fast", "--out", str(folder), "-q")
    assert code == 0 and text == ""  # a second run replaces its own report folder
    code, _, err = _run_main(capsys, "demo", "--fast", "--out", str(tmp_path))
    assert code == 2 and "exists and is not a prunekit demo report" in err


@pytest.mark.slow
def test_demo_in_a_process(tmp_path):
    done = _cli("demo", "--out", str(tmp_path / "demo"), "--threads", "2")
    assert done.returncode == 0, done.stderr
    assert "structured 50%" in done.stdout and (tmp_path / "demo" / "report.md").is_file()


def test_structured_stage_through_a_recipe(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("input_shape: [2, 1, 8, 8]\nstages:\n"
                      "  - {type: unstructured, sparsity: 0.5, schedule: {steps: 2}}\n"
                      "  - {type: structured, ratio: 0.5, importance: l1}\n")
    out = tmp_path / "o"
    code, text, err = _run_main(capsys, "prune", FACTORY, "--recipe", str(recipe), "--out",
                                str(out))
    assert code == 0, err
    model = prunekit.load(DigitsCNN, out)
    assert (model.features[0].out_channels, model.classifier[1].in_features) == (16, 512)
    plan = json.loads((out / "structure.json").read_text())["plans"][0]
    assert plan["settings"]["importance"] == "l1" and plan["settings"]["ratio"] == 0.5
    assert text.splitlines()[0].split()[:2] == ["model", "params"]


@pytest.mark.parametrize("extra", ["", ", dense_targets: true, exact_update: true",
                                   ", dense_targets: true, offload_folder: {tmp}"])
def test_oneshot_stage_with_calibration_data(tmp_path, capsys, extra):
    save_file({"inputs": torch.randn(16, 1, 8, 8)}, str(tmp_path / "c.safetensors"))
    recipe = tmp_path / "r.yaml"
    extra = extra.format(tmp=tmp_path)
    recipe.write_text(f"calibration: {{file: {tmp_path / 'c.safetensors'}, batches: 2, "
                      "batch_size: 8}\n"
                      f"stages: [{{type: oneshot, method: sparsegpt, sparsity: 0.5{extra}}}]\n")
    out = tmp_path / "o"
    code, _, err = _run_main(capsys, "prune", FACTORY, "--recipe", str(recipe), "--out", str(out),
                             "-q")
    assert code == 0, err
    model = prunekit.load(DigitsCNN, out)
    assert float((model.classifier[1].weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    run = json.loads((out / "run.json").read_text())
    assert run["example_shapes"] == [[1, 1, 8, 8]]
