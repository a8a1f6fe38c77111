"""A batch killed with SIGKILL midway (a power cut, the out-of-memory killer, ``kill -9``)
and run again completes with every output whole.

A real ``cellfit predict`` process is killed: no clean-up code can run when it dies,
so what it leaves is what the output folder holds at that instant. Nothing here depends on how
fast the machine is: the test waits for the first finished file and for the next one
to be in progress, kills, and checks outcomes only.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from cellfit.batch import predict_files
from cellfit.cli import main
from cellfit.model import ModelInfo, build_model, save_model
from cellfit.outputs import tmp_name
from cellfit.synthetic import synthetic_cells

N_FILES = 3
PLANES = 4
SHAPE = (96, 96)
#: the longest a batch of this size may take on a slow, shared machine
PATIENCE = 300.0


def _cellfit() -> list[str]:
    """The installed ``cellfit`` command (beside this Python), else its entry point."""
    exe = Path(sys.executable).with_name("cellfit")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from cellfit.cli import main; sys.exit(main())"]


def _start(args: list, log: Path) -> subprocess.Popen:
    """``cellfit`` with ``args`` in its own process group, output into ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [*_cellfit(), *map(str, args)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _outputs(i: int) -> list[str]:
    return [f"f{i}_labels.tif", f"f{i}_prob.tif"]


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file in ``folder`` with its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def _assert_whole(path: Path, ref: Path) -> None:
    """``path`` is a complete output: readable, of the right shape and type, and equal to
    the uninterrupted run's."""
    got, want = tifffile.imread(path), tifffile.imread(ref)
    assert got.shape == want.shape and got.dtype == want.dtype, path.name
    if path.name.endswith("_labels.tif"):
        np.testing.assert_array_equal(got, want, err_msg=path.name)
    else:
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=path.name)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One torch thread here as in the ``cellfit`` processes (``OMP_NUM_THREADS=1``):
    the same arithmetic everywhere, so outputs compare exactly."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict[str, Path]:
    """A tiny model, a folder of small stacks and their outputs from an uninterrupted run."""
    root = tmp_path_factory.mktemp("kill")
    torch.manual_seed(0)
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16] * 5)
    model = save_model(root / "tiny.cellfit", build_model(info), info)
    inputs = root / "in"
    inputs.mkdir()
    for i in range(N_FILES):
        stack = np.stack(
            [synthetic_cells(SHAPE, n_cells=6, seed=10 * i + k)[0] for k in range(PLANES)]
        )
        tifffile.imwrite(inputs / f"f{i}.tif", stack, photometric="minisblack")
    ref = root / "ref"
    events = list(predict_files(model, [inputs], ref, device="cpu", probabilities=True))
    assert {ev.status for ev in events if ev.status != "plane"} == {"done"}
    return {"root": root, "model": model, "inputs": inputs, "ref": ref}


def test_a_batch_killed_midway_and_run_again_leaves_every_output_whole(batch, capsys):
    out = batch["root"] / "out"
    options = ["--out", out, "--device", "cpu", "--probabilities"]
    args = ["predict", batch["model"], batch["inputs"], *options]
    first = _outputs(0)

    # 1. run, and kill it (SIGKILL: no clean-up runs) once the first file is finished and
    #    the writing of the next one shows in the folder
    proc = _start(args, batch["root"] / "killed.log")
    deadline = time.monotonic() + PATIENCE
    try:
        while True:
            names = {p.name for p in out.iterdir()} if out.is_dir() else set()
            if set(first) <= names and len(names) > len(first):
                break
            assert proc.poll() is None, (
                "the batch ended before it could be killed:\n"
                + (batch["root"] / "killed.log").read_text()
            )
            assert time.monotonic() < deadline, "the first file never finished"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # what the killed process left: every file under a final name is whole; the file
    # in progress exists only as a hidden temporary
    left = _files(out)
    finished = sorted(n for n in left if not n.startswith("."))
    assert set(first) <= set(finished)
    assert len(finished) < 2 * N_FILES  # killed midway, not after the end
    for name in finished:
        _assert_whole(out / name, batch["ref"] / name)
    complete = [i for i in range(N_FILES) if set(_outputs(i)) <= set(finished)]

    # 2. the same command again (here, in this process): it finishes the batch, skipping
    #    the finished files
    code = main([str(a) for a in args])
    log = capsys.readouterr().err
    assert code == 0, log
    assert f"{N_FILES - len(complete)} file(s) segmented" in log, log
    assert re.search(rf"\b{len(complete)} skipped\b", log), log

    # every output whole and equal to the uninterrupted run's; no temporary left behind;
    # the files finished before the kill untouched (skipped, not written again)
    after = _files(out)
    assert sorted(after) == sorted(n for i in range(N_FILES) for n in _outputs(i))
    for name in after:
        _assert_whole(out / name, batch["ref"] / name)
    for i in complete:
        for name in _outputs(i):
            assert after[name] == left[name], f"{name} was written again"


def test_the_scratch_of_a_huge_plane_left_by_a_killed_run_is_removed_on_the_rerun(batch):
    """Huge planes are labelled through a scratch folder beside the outputs: a run killed
    in the middle leaves it (with its temporaries), and the rerun removes both."""
    folder = batch["root"] / "huge"
    folder.mkdir()
    tifffile.imwrite(folder / "h.tif", synthetic_cells(SHAPE, n_cells=6, seed=3)[0])
    out = batch["root"] / "huge_out"
    scratch = tmp_name(out / "h.work")  # as the huge-plane path names it
    (scratch / "labels0").mkdir(parents=True)
    (scratch / "labels0" / "zarr.json").write_text("{}")
    tmp_name(out / "h_labels.tif").write_bytes(b"half a file")
    huge = SHAPE[0] * SHAPE[1] // 2  # its plane goes the huge-plane way
    events = list(predict_files(batch["model"], [folder], out, device="cpu", huge_pixels=huge))
    assert [ev.status for ev in events if ev.status != "plane"] == ["done"]
    assert sorted(os.listdir(out)) == ["h_labels.tif"]
