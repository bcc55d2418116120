"""Checkpoints (issue 15): manifests with sizes and CRC-32, verification on resume, fallback past a damaged newest
checkpoint, same-step replacement, pruning out of the namespace first, leftovers, failed writes, old markers; and the
metrics file on resume (torn line, wandb steps already sent)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from unitrain.errors import CheckpointError
from unitrain.recipe import validate
from unitrain.train import checkpoint as ckpt
from unitrain.train.track import read_metrics, resume_metrics

from conftest import word_recipe_dict


class FakeBackend:
    """Writes one weights file of `size` bytes (content = the step), like TorchBackend.save's files."""

    def __init__(self, size: int = 1000, fail: Exception | None = None):
        self.size, self.fail, self.loaded = size, fail, None

    def save(self, folder: Path) -> None:
        if self.fail:
            (folder / "trainable.safetensors").write_bytes(b"x" * 10)  # a partial file, then the error
            raise self.fail
        (folder / "trainable.safetensors").write_bytes(bytes([len(list(folder.parent.glob("step-*")))]) * self.size)
        (folder / "optimizer.pt").write_bytes(b"o" * 100)

    def load(self, folder: Path) -> None:
        self.loaded = folder


def _save(d: Path, step: int, keep: int = 3, backend=None) -> Path:
    return ckpt.save_checkpoint(d, step, backend or FakeBackend(), {"step": step}, keep)


def test_marker_is_a_manifest_and_verify_catches_truncation_loss_and_corruption(tmp_path):
    p = _save(tmp_path, 2)
    manifest = json.loads((p / ckpt.MARKER).read_text())
    assert manifest["step"] == 2 and manifest["checksums"] == "crc32"
    assert manifest["files"]["trainable.safetensors"]["size"] == 1000
    assert set(manifest["files"]) == {"trainable.safetensors", "optimizer.pt", "rng-rank0.pt", "trainer_state.json"}
    assert ckpt.verify(p) == ("verified", "sizes and CRC-32 checksums match")
    w = p / "trainable.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped: same size
    assert ckpt.verify(p)[0] == "damaged" and "CRC-32 differs" in ckpt.verify(p)[1]
    w.write_bytes(b"garbage")
    assert ckpt.verify(p) == ("damaged", "trainable.safetensors has 7 bytes, 1000 expected")
    w.unlink()
    assert ckpt.verify(p) == ("damaged", "trainable.safetensors is missing")


def test_checksums_stop_above_the_size_cap_sizes_stay(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITRAIN_CHECKSUM_MAX_BYTES", "500")
    p = _save(tmp_path, 2)
    manifest = json.loads((p / ckpt.MARKER).read_text())
    assert manifest["checksums"] == "none" and "crc32" not in manifest["files"]["trainable.safetensors"]
    assert ckpt.verify(p) == ("verified", "sizes match")


def test_auto_resume_falls_back_past_a_damaged_newest_one_and_keeps_it_aside(tmp_path):
    for s in (2, 4, 6):
        _save(tmp_path, s)
    (tmp_path / "step-6" / "trainable.safetensors").write_bytes(b"short")
    said = []
    assert ckpt.find_resume(tmp_path, "auto", 0, said.append) == tmp_path / "step-4"
    msg = " ".join(said)
    assert "WARNING: the newest checkpoint is damaged: step-6 (trainable.safetensors has 5 bytes" in msg
    assert "Resuming from step-4 instead" in msg
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith("step-6.damaged-")]
    assert len(aside) == 1 and aside[0] in msg and not (tmp_path / "step-6").exists()
    assert (tmp_path / aside[0] / "optimizer.pt").exists()  # kept whole, not deleted
    # the run saves step 6 again: a fresh, verified folder; pruning counts only the step-N namespace
    _save(tmp_path, 6, keep=2)
    assert [s for s, _ in ckpt.list_complete(tmp_path)] == [4, 6] and ckpt.verify(tmp_path / "step-6")[0] == "verified"
    assert (tmp_path / aside[0]).exists()


def test_explicit_resume_of_a_damaged_checkpoint_is_an_error_that_deletes_nothing(tmp_path):
    p = _save(tmp_path, 2)
    (p / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"output.resume=.*step-2: not a complete, intact unitrain checkpoint: "
                                              r"optimizer.pt is missing. Nothing was deleted"):
        ckpt.find_resume(tmp_path, str(p))
    assert p.exists()


def test_no_verified_checkpoint_starts_over_loudly(tmp_path):
    (_save(tmp_path, 2) / "optimizer.pt").write_bytes(b"")
    said = []
    assert ckpt.find_resume(tmp_path, "auto", 0, said.append) is None
    assert "WARNING: no checkpoint verifies: step-2 (optimizer.pt has 0 bytes, 100 expected" in said[0]


def test_a_same_step_save_replaces_a_damaged_folder_and_keeps_an_intact_one(tmp_path):
    first = _save(tmp_path, 4)
    marker = (first / ckpt.MARKER).read_text()
    _save(tmp_path, 4)  # a repeat (SIGTERM right after a periodic save): the intact folder stays as it is
    assert (first / ckpt.MARKER).read_text() == marker and not list(tmp_path.glob("step-4.*"))
    (first / "trainable.safetensors").write_bytes(b"bad")
    _save(tmp_path, 4)
    assert ckpt.verify(first)[0] == "verified"
    assert [p.name.split("-20")[0] for p in tmp_path.glob("step-4.*")] == ["step-4.damaged"]


def test_start_removes_leftovers_and_sets_aside_a_markerless_step(tmp_path):
    _save(tmp_path, 2)
    shutil.copytree(tmp_path / "step-2", tmp_path / "step-9")
    (tmp_path / "step-9" / ckpt.MARKER).unlink()  # e.g. half-deleted by an older unitrain's prune
    (tmp_path / ".tmp-step-4").mkdir()
    (tmp_path / ".trash-step-1-123").mkdir()
    said = []
    assert ckpt.find_resume(tmp_path, "auto", 0, said.append) == tmp_path / "step-2"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "step-2" and names[1].startswith("step-9.incomplete-") and len(names) == 2
    assert "removed .tmp-step-4" in said[0] and "removed .trash-step-1-123" in said[0] and "set aside step-9" in said[0]
    # other ranks only read: they reach the same answer and rename nothing
    (tmp_path / ".tmp-step-6").mkdir()
    assert ckpt.find_resume(tmp_path, "auto", 1) == tmp_path / "step-2" and (tmp_path / ".tmp-step-6").exists()


def test_prune_leaves_the_namespace_before_deleting(tmp_path, monkeypatch):
    _save(tmp_path, 2, keep=1)

    real = shutil.rmtree

    def interrupted(path, *a, **kw):  # Ctrl-C in the middle of deleting the old checkpoint
        if "step-2" not in str(path):
            return real(path, *a, **kw)
        next(Path(path).iterdir()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 4, keep=1)
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_complete(tmp_path)] == [4]
    trash = [p for p in tmp_path.iterdir() if p.name.startswith(".trash-step-2-")]
    assert len(trash) == 1 and not (tmp_path / "step-2").exists()
    ckpt.find_resume(tmp_path, "auto")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4"]


def test_a_failed_write_names_the_folder_and_free_space_and_removes_the_temp(tmp_path):
    _save(tmp_path, 2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "step-2").iterdir()}
    full = FakeBackend(fail=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(CheckpointError) as e:
        _save(tmp_path, 4, backend=full)
    msg = str(e.value)
    assert f"could not write checkpoint step-4 into {tmp_path / '.tmp-step-4'} (OSError: [Errno 28] No space" in msg
    assert "free on that filesystem" in msg and "complete checkpoints are untouched (step-2)" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "step-2").iterdir()} == before


def test_an_old_marker_with_just_the_step_loads_unverified(tmp_path):
    p = _save(tmp_path, 2)
    (p / ckpt.MARKER).write_text("2")  # what unitrain wrote before manifests
    assert ckpt.verify(p)[0] == "unverified"
    said = []
    assert ckpt.find_resume(tmp_path, "auto", 0, said.append) == p
    assert said == [f"checkpoint {p}: its COMPLETE marker comes from an older unitrain and lists no file sizes; "
                    f"loading it unverified"]


def test_a_run_resumes_past_a_damaged_newest_checkpoint_exactly(word_corpus, tmp_path):
    """The case the issue met: the newest checkpoint of a finished run is damaged. The relaunch falls back to the
    older one, trains the missing steps again with the same losses, and writes a fresh, verified newest one."""
    from unitrain.train.run import run_recipe

    r = validate(word_recipe_dict(word_corpus, tmp_path, "fb") | {"output": {
        "dir": str(tmp_path), "save_every": 2, "keep_last": 2}})
    first = run_recipe(r)
    losses = {m["step"]: m["loss"] for m in read_metrics(first.run_dir) if "loss" in m}
    ck = first.run_dir / "checkpoints"
    assert [s for s, _ in ckpt.list_complete(ck)] == [6, 8]
    (ck / "step-8" / "trainable.safetensors").write_bytes(b"garbage")
    again = run_recipe(r)
    assert again.exit_code == 0 and again.steps == 8
    assert {m["step"]: m["loss"] for m in read_metrics(again.run_dir) if "loss" in m} == losses
    assert again.final_eval_loss == first.final_eval_loss
    assert ckpt.verify(ck / "step-8")[0] == "verified" and len(list(ck.glob("step-8.damaged-*"))) == 1


def test_resume_repairs_a_torn_metrics_line_and_remembers_what_wandb_has(tmp_path, capsys):
    rows = [{"step": 0, "eval_loss": 5.0}] + [{"step": s, "loss": 4.0 - s / 10} for s in range(1, 6)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 6, "lo')  # killed mid-write
    assert read_metrics(tmp_path) == rows  # readers skip the torn line too
    said = []
    assert resume_metrics(tmp_path, 4, said.append) == 5  # steps up to 5 were sent before the kill
    assert said == ["metrics.jsonl: dropped 1 unreadable line(s) (line 7; a kill mid-write leaves a torn last line)"]
    assert read_metrics(tmp_path) == rows[:5]
    # a second relaunch before step 5 is logged again still knows it was sent
    assert resume_metrics(tmp_path, 4, said.append) == 5 and len(said) == 1
    assert resume_metrics(tmp_path, 0) == 5 and read_metrics(tmp_path) == []  # a fresh start keeps no rows


def test_wandb_resumes_the_same_run_and_skips_steps_it_has(word_corpus, tmp_path, monkeypatch):
    """wandb (offline in tests) knows no history offline, and online drops steps below its counter with a warning:
    the tracker itself sends each step once, to the one run id of the run directory."""
    import wandb

    from unitrain.train.track import Tracker

    calls = []

    class FakeRun:
        def log(self, row, step=None):
            calls.append(step)

        def finish(self):
            pass

    inits = []
    monkeypatch.setattr(wandb, "init", lambda **kw: inits.append(kw) or FakeRun())
    r = validate(word_recipe_dict(word_corpus, tmp_path, "wb") | {"tracking": {"wandb": "offline", "progress": False}})
    run_dir = tmp_path / "wb"
    run_dir.mkdir()
    t = Tracker(run_dir, r, {}, 8, 0)
    for s in range(0, 6):
        t.log({"step": s, "loss": 1.0})
    t.close()
    t = Tracker(run_dir, r, {}, 8, 4)  # killed at step 5, resumed from checkpoint 4
    for s in range(5, 9):
        t.log({"step": s, "loss": 1.0})
    t.close()
    assert calls == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # step 5 went once
    assert [kw["id"] for kw in inits] == [inits[0]["id"]] * 2 and inits[1]["resume"] == "allow"
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(0, 9))
    never = validate(word_recipe_dict(word_corpus, tmp_path, "wb") | {
        "tracking": {"wandb": "offline", "progress": False}, "output": {"dir": str(tmp_path), "resume": "never"}})
    Tracker(run_dir, never, {}, 8, 0).log({"step": 1, "loss": 1.0})  # training from scratch: a new wandb run
    assert inits[2]["id"] != inits[0]["id"] and calls[-1] == 1
