"""The `accel` CLI, run in-process (one subprocess check that the console script exists)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from accel.cli import main


def test_generate_png_with_report(tmp_path, capsys):
    out = tmp_path / "img.png"
    code = main(["generate", "--model", "tiny-flux", "--prompt", "a red circle", "--steps", "3",
                 "--height", "64", "--width", "64", "--accel", "fbcache:threshold=0.5", "--out", str(out), "--report"])
    assert code == 0
    assert Image.open(out).size == (64, 64)
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index("{"):])
    assert report["steps"] == 3


def test_generate_mp4_for_video_models(tmp_path):
    out = tmp_path / "clip.mp4"
    code = main(["generate", "--model", "tiny-wan", "--prompt", "a ball", "--steps", "2", "--height", "32",
                 "--width", "32", "--frames", "5", "--out", str(out)])
    assert code == 0
    import imageio.v3 as iio

    frames = iio.imread(out, plugin="pyav") if _has_pyav() else iio.imread(out)
    assert len(frames) == 5


def _has_pyav():
    try:
        import av  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--accel", "nope"], "unknown accelerator or preset"),
        (["--accel", "fbcache:threshold=9"], "fbcache.threshold"),
        (["--steps", "0"], "num_inference_steps"),
        (["--height", "65"], "height: 65 is not a multiple"),
        (["--model", "missing-model"], "not a built-in name"),
        (["--frames", "5"], "num_frames: not supported"),
    ],
)
def test_generate_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    code = main(["generate", "--prompt", "x", "--out", str(tmp_path / "x.png"), *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_writes_json_markdown_and_grid(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\na blue square at the top\n")
    out = tmp_path / "bench"
    code = main(["bench", "--model", "tiny-flux", "--prompts", str(prompts), "--seeds", "1", "--steps", "6",
                 "--height", "64", "--width", "64", "--accel", "fbcache:threshold=0", "--accel", "fbcache:threshold=0.5",
                 "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["spec"]: r for r in report["results"]}
    assert rows["baseline"]["psnr"] == 100.0 and rows["baseline"]["block_fraction_computed"] == 1.0
    assert rows["fbcache:threshold=0.0"]["psnr"] == 100.0
    assert rows["fbcache:threshold=0.0"]["block_fraction_computed"] == 1.0
    assert rows["fbcache:threshold=0.5"]["block_fraction_computed"] < 1.0
    assert rows["fbcache:threshold=0.5"]["psnr"] < 100.0
    assert "| spec | speedup" in (out / "report.md").read_text()
    assert rows["baseline"]["adherence"] is not None  # prompts in the shapes grammar get the adherence score
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 3 * 64 and grid.size[1] > 2 * 64


def test_bench_on_video_compares_frame_by_frame(tmp_path):
    out = tmp_path / "bench"
    code = main(["bench", "--model", "tiny-wan", "--prompt", "a ball", "--steps", "4", "--height", "32",
                 "--width", "32", "--frames", "5", "--accel", "fbcache:threshold=0.5", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "report.json").read_text())["results"]
    assert rows[1]["ssim"] is not None


def test_make_model_and_generate_from_directory(tmp_path):
    assert main(["make-model", "tiny-flux", str(tmp_path / "m")]) == 0
    out = tmp_path / "img.png"
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--steps", "2", "--out", str(out)]) == 0
    assert out.is_file()


def test_console_script_help_runs():
    exe = Path(sys.executable).with_name("accel")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "generate" in result.stdout and "bench" in result.stdout


def test_the_library_and_its_cli_do_not_import_the_server():
    """`accel` works without the `server` extra: importing it (and its CLI) loads no server or HTTP module."""
    code = ("import sys, accel, accel.cli, accel.generate; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'server', 'fastapi', 'starlette', 'uvicorn', 'prometheus_client', 'pydantic_settings'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
