"""Short CPU runs on the synthetic source: run-directory contract, precisions, exact resume."""
import json
import subprocess
import sys

import pytest
import torch

from fast_ressl.cli import main
from fast_ressl.checkpoint import safe_load
from fast_ressl.config import load_config
from fast_ressl.train import ConfigMismatch, train

TINY = ["data.source=synthetic", "data.num_samples=32", "data.weak={size: 32}", "data.strong=[{size: 32}]", "data.eval_resize=32",
        "model.backbone=test_resnet", "model.small_input_stem=false", "model.proj_hidden_dim=32", "model.proj_dim=16",
        "method.queue_size=64", "method.compile_loss=false", "train.batch_size=8", "train.epochs=2",
        "train.log_every=1", "optim.warmup_epochs=0.5"]


def _cfg(run_dir, *extra):
    return load_config(None, TINY + [f"run.dir={run_dir}", *extra])


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_contract(tmp_path):
    run = tmp_path / "run"
    summary = train(_cfg(run), live=False)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    records = _metrics(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert {"step", "epoch", "loss", "lr", "img_per_s"} <= r.keys()
        assert torch.isfinite(torch.tensor(r["loss"]))
    assert [r["epoch"] for r in records] == [0] * 4 + [1] * 4
    assert summary["status"] == "completed" and summary["step"] == 8
    assert json.loads((run / "summary.json").read_text())["step"] == 8
    ckpt = safe_load(run / "checkpoints" / "last.pt")
    assert ckpt["world_size"] == 1 and len(ckpt["ranks"]) == 1 and ckpt["skipped_steps"] == 0
    assert ckpt["step"] == 8 and ckpt["queue"]["ptr"].item() == (8 * 8) % 64
    assert load_config(run / "config.yaml").train.batch_size == 8  # the resolved config reloads


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precisions_give_finite_loss(tmp_path, precision):
    summary = train(_cfg(tmp_path / precision, f"train.precision={precision}", "train.stop_at_step=2"),
                    live=False)
    assert summary["status"] == "stopped" and summary["final_loss"] == pytest.approx(summary["final_loss"])
    assert torch.isfinite(torch.tensor(summary["final_loss"]))


def test_extended_options_and_multicrop_run(tmp_path):
    cfg = _cfg(tmp_path / "ext", "model.predictor=true", "model.pred_hidden_dim=24",
               "method.infonce_warmup_epochs=1", "method.infonce_handover=linear",
               "method.momentum_schedule=cosine", "method.compile_loss=true",
               "train.precision=fp32",  # see build_env: CPU bf16 + mixed view sizes is not deterministic
               "data.strong=[{size: 32}, {size: 24}, {size: 16}]")
    summary = train(cfg, live=False)
    assert summary["status"] == "completed"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _metrics(tmp_path / "ext"))


def _state(run):
    return safe_load(run / "checkpoints" / "last.pt")


def test_second_invocation_resumes_with_identical_state(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg(a), live=False)
    first = train(_cfg(b, "train.stop_at_step=3"), live=False)
    assert first["step"] == 3
    second = train(_cfg(b), live=False)  # the same command again: resumes at step 4
    assert second["step"] == 8
    steps_b = [r["step"] for r in _metrics(b)]
    assert steps_b == [1, 2, 3, 4, 5, 6, 7, 8]  # continued at the next step, none repeated
    assert [r["loss"] for r in _metrics(a)] == [r["loss"] for r in _metrics(b)]
    sa, sb = _state(a), _state(b)
    for key in ("student", "teacher"):
        for name, tensor in sa[key].items():
            assert torch.equal(tensor, sb[key][name]), f"{key}.{name}"
    assert torch.equal(sa["queue"]["buffer"], sb["queue"]["buffer"])
    assert sa["queue"]["ptr"].item() == sb["queue"]["ptr"].item()
    mom_a = sa["optimizer"]["state"]
    assert all(torch.equal(mom_a[i]["momentum_buffer"], sb["optimizer"]["state"][i]["momentum_buffer"])
               for i in mom_a)


def test_resume_with_changed_config_is_refused(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, "train.stop_at_step=2"), live=False)
    with pytest.raises(ConfigMismatch, match="method.tau_t"):
        train(_cfg(run, "method.tau_t=0.05"), live=False)
    summary = train(_cfg(run, "method.tau_t=0.05"), allow_config_change=True, live=False)
    assert summary["step"] == 8
    # a finished run: the same command again does nothing and keeps the summary
    again = train(_cfg(run, "method.tau_t=0.05"), allow_config_change=True, live=False)
    assert again == summary == json.loads((run / "summary.json").read_text())


def test_resume_with_changed_optimizer_settings_trains_with_the_new_ones(tmp_path, monkeypatch):
    """--allow-config-change with optim.weight_decay, optim.momentum and optim.fused changed: the
    optimizer's state carries over and its settings are the new config's. torch's load_state_dict
    restored the old ones into every param group (the log named the change, the run kept the old
    values), and fused false -> true crashed at the first step (found in review). A change of the
    parameter groups themselves (optim.weight_decay_filter) is refused, naming it."""
    from fast_ressl import train as T

    run = tmp_path / "run"
    train(_cfg(run, "optim.fused=false", "optim.weight_decay=1e-4", "train.stop_at_step=2"), live=False)
    seen = {}
    real = T.State._load_optimizer

    def spy(self, saved):
        real(self, saved)
        seen["groups"] = [{k: g[k] for k in ("weight_decay", "momentum", "fused")} for g in self.optimizer.param_groups]
        seen["state"] = len(self.optimizer.state)

    monkeypatch.setattr(T.State, "_load_optimizer", spy)
    new = ("optim.fused=true", "optim.weight_decay=5e-4", "optim.momentum=0.8")
    summary = train(_cfg(run, *new), allow_config_change=True, live=False)
    assert summary["status"] == "completed" and summary["step"] == 8
    assert seen["state"] > 0  # the momentum buffers came over
    assert {(g["momentum"], g["fused"]) for g in seen["groups"]} == {(0.8, True)}
    assert {g["weight_decay"] for g in seen["groups"]} <= {5e-4, 0.0}  # decayed and not-decayed groups
    monkeypatch.undo()
    with pytest.raises(ConfigMismatch, match="parameter groups changed"):
        train(_cfg(run, *new, "optim.weight_decay_filter=none", "train.epochs=3"), allow_config_change=True,
              live=False)


@pytest.mark.parametrize("before,after", [("fp32", "fp16"), ("fp16", "bf16")])
def test_resume_across_loss_scaling_with_allow_config_change(tmp_path, capsys, before, after):
    """A run without loss scaling (fp32/bf16: its GradScaler is disabled and saves {}) resumed with
    train.precision=fp16 (a CPU smoke run moved to a GPU) ended in torch's "The source state dict
    is empty" (found in review); now fp16 starts its loss scale afresh and says so. The other way,
    the fp16 scale is dropped."""
    run = tmp_path / "run"
    train(_cfg(run, f"train.precision={before}", "train.stop_at_step=2"), live=False)
    capsys.readouterr()
    summary = train(_cfg(run, f"train.precision={after}"), allow_config_change=True, live=False)
    out = capsys.readouterr()
    assert summary["status"] == "completed" and summary["step"] == 8
    assert ("loss scaling starts afresh at 65536" in out.out + out.err) == (after == "fp16")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _metrics(run))


def _as_older_version(run, *dotted):
    """Rewrite last.pt as a fast_ressl without the config keys `dotted` would have written it: the
    stored config lacks them and its hash is of the config without them."""
    import hashlib

    from fast_ressl.checkpoint import atomic_save
    from fast_ressl.config import RUN_CONTROL_KEYS

    path = run / "checkpoints" / "last.pt"
    sd = safe_load(path)
    for key in dotted:
        section, name = key.split(".")
        del sd["config"][section][name]
    data = json.loads(json.dumps(sd["config"]))
    for key in RUN_CONTROL_KEYS:  # as config_hash does
        section, name = key.split(".")
        data[section].pop(name, None)
    sd["config_hash"] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    path.unlink()  # a hard link to step_*.pt: write a file of its own
    atomic_save(sd, path)


def test_resume_accepts_keys_added_since_at_their_defaults(tmp_path, capsys):
    """A checkpoint of an older fast_ressl (its config lacks keys added since) resumes without
    --allow-config-change when those keys hold their defaults; a non-default value is refused."""
    run = tmp_path / "run"
    train(_cfg(run, "train.stop_at_step=2"), live=False)
    _as_older_version(run, "model.compile_mode", "method.infonce_tau")
    with pytest.raises(ConfigMismatch, match=r"method.infonce_tau: None -> 0.3"):
        train(_cfg(run, "method.infonce_tau=0.3", "train.stop_at_step=4"), live=False)
    capsys.readouterr()
    summary = train(_cfg(run, "train.stop_at_step=4"), live=False)
    assert summary["step"] == 4
    out = capsys.readouterr()
    assert "at their defaults: model.compile_mode, method.infonce_tau" in out.out + out.err


def test_cli_train_and_config_errors(tmp_path):
    run = tmp_path / "cli"
    cmd = [sys.executable, "-m", "fast_ressl", "train", "configs/demo.yaml", *TINY, f"run.dir={run}",
           "train.stop_at_step=2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "step 2/8" in out.stdout and (run / "summary.json").exists()
    bad = subprocess.run(cmd + ["train.epochz=3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "train.epochz" in bad.stderr


def test_an_unknown_option_shows_its_commands_usage(capsys):
    """argparse named the option with the top level's usage ("fast-ressl [-h] COMMAND ..."), which
    does not say what the command takes."""
    with pytest.raises(SystemExit) as e:
        main(["knn", "runs/x", "--data", "imgs"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: fast-ressl knn" in err and "--train-root" in err
    assert "fast-ressl knn: error: unrecognized arguments: --data imgs" in err
    with pytest.raises(SystemExit):  # one before the command is the top level's
        main(["--data", "knn", "runs/x"])
    assert "fast-ressl: error: unrecognized arguments: --data" in capsys.readouterr().err


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    train(_cfg(run, "train.stop_at_step=3"), live=False)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert {"train/lr", "train/img_per_s", "train/data_wait_frac"} <= set(acc.Tags()["scalars"])
