"""Resuming a job safely: the measure that chose its best weights, and an epoch whose
validation a kill interrupted."""

from __future__ import annotations

import pytest
from training_jobs import metrics, read_json, tiny

from trainer.errors import UserError
from trainer.training import loop, train


def _latest(job_dir) -> dict:
    return read_json(job_dir / "ckpt" / "latest.json")["checkpoints"][0]


def test_a_resume_that_would_choose_the_best_by_another_measure_is_refused(corpus, tmp_path):
    train.train(tiny(corpus, tmp_path, epochs=1))
    kept = read_json(tmp_path / "best.json")
    assert kept["monitor"] == "val_loss"
    # The validation flag left out: the job would keep its best by the training loss.
    with pytest.raises(UserError, match=r"best weights were chosen by val_loss, this run would "
                       r"choose by loss \(no validation data: --val_data or --val_fraction\): "
                       r"resume with the validation data and --monitor=val_loss"):
        train.train(tiny(corpus, tmp_path, epochs=2, val_fraction=0.0))
    with pytest.raises(UserError, match="chosen by val_loss, this run would choose by "
                       "val_carried_loss: resume"):
        train.train(tiny(corpus, tmp_path, epochs=2, monitor="val_carried_loss"))
    assert read_json(tmp_path / "best.json") == kept
    assert [h["epoch"] for h in metrics(tmp_path)] == [1]


def test_a_job_killed_while_it_validates_a_stopped_epoch_validates_it_on_resume(
        corpus, tmp_path, monkeypatch):
    """A stop seen at epoch 2's last step saves, then validates; the job is killed during
    that validation (SIGKILL after a preemption's grace period). The resume validates
    and reports epoch 2 before it trains epoch 3, with epoch 2's own training figures."""
    class Killed(BaseException):
        pass

    cfg = tiny(corpus, tmp_path, epochs=3, steps_per_epoch=3,
               sample_length=0, val_steps=1)
    build = loop.Loop.__init__

    def init(self, *args, **kwargs):
        build(self, *args, **kwargs)
        agree, evaluate = self.agree, self.evaluate

        def stop_at_step_6(stop):
            agree(stop)
            if int(self.progress["step"].numpy()) == 6:
                self.stop_by = "SIGTERM"

        def killed_while_stopping():
            if self.stop_by:
                raise Killed
            return evaluate()

        self.agree, self.evaluate = stop_at_step_6, killed_while_stopping

    monkeypatch.setattr(loop.Loop, "__init__", init)
    with pytest.raises(Killed):
        train.train(cfg)
    monkeypatch.undo()
    assert [h["epoch"] for h in metrics(tmp_path)] == [1] and _latest(tmp_path)["step"] == 6
    train.train(cfg)
    history = metrics(tmp_path)
    assert [(h["epoch"], h["step"]) for h in history] == [(1, 3), (2, 6), (3, 9)]
    assert history[1]["loss"] > 0 and history[1]["chars_per_sec"] > 0
    assert "val_loss" in history[1]
    assert _latest(tmp_path)["step"] == 9
