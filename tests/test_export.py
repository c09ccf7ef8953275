"""Export to Hub-style folders (``python -m sedd_ray.export``) and loading them back.

One tiny run (no Ray) is trained once per module; every test exports its checkpoint.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from sedd_ray import export as export_cli
from sedd_ray import hub
from sedd_ray import results as R
from sedd_ray import sample as sample_cli
from sedd_ray import train as train_cli
from sedd_ray.model import ScoreModel
from sedd_ray.sample import load_model

# tests/test_bad_input.py's tiny flags: the same data config (and data cache) as tiny_config
TINY = ["--preset", "tiny", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "8",
        "--steps", "2", "--log-every", "1", "--eval-every", "2", "--ckpt-every", "2",
        "--eval-sequences", "8", "--eval-draws", "2", "--test-draws", "0",
        "--sample-count", "0", "--progress", "false", "--hidden-size", "32",
        "--cond-dim", "16", "--n-heads", "2", "--n-layers", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The last checkpoint of a 4-step run of ``python -m sedd_ray.train``."""
    from sedd_ray.checkpoint import latest_checkpoint
    from sedd_ray.layout import TrainerFiles

    out = tmp_path_factory.mktemp("trained") / "run"
    assert train_cli.main([*TINY, "--steps", "4", "--no-ray", "--output", str(out)]) == 0
    return latest_checkpoint(TrainerFiles(out).checkpoints)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "model"
    assert export_cli.main(["--checkpoint", str(trained), str(out)]) == 0
    return out


def one_error_line(capfd, rc: int, code: int) -> str:
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == code and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_round_trip_is_bitwise_the_checkpoints_ema(trained, exported):
    ema = load_model(trained).model
    pre = ScoreModel.from_pretrained(str(exported))
    model, graph, noise = pre
    assert pre.format == "sedd-ray" and pre.tokenizer_name == "bpe" and pre.vocab_size == 300
    assert type(noise).__name__ == "LogLinear" and graph.dim == 301
    ours, theirs = model.state_dict(), ema.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, graph.dim, (4, 32), generator=g)
    sigma = torch.rand(4, generator=g) * 5 + 1e-3
    with torch.no_grad():
        assert torch.equal(model(x, sigma), ema(x, sigma))
    # the raw (non-EMA) weights differ after 4 steps: the export really holds the EMA ones
    state = torch.load(trained / "state.pt", weights_only=True)
    assert any(not torch.equal(state["model"][k], ours[k]) for k in ours)


def test_exported_folder_holds_no_pickle(exported):
    names = sorted(p.name for p in exported.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    for p in exported.iterdir():
        data = p.read_bytes()
        assert p.suffix not in (".pt", ".bin", ".pkl", ".pth", ".ckpt")
        assert not data.startswith((b"\x80", b"PK\x03\x04"))  # pickle protocol 2+, torch zip
        with pytest.raises(Exception):  # noqa: B017 - any failure: it is not a pickle
            pickle.loads(data)
        if p.name != "model.safetensors":
            with pytest.raises(pickle.UnpicklingError):
                torch.load(p, weights_only=True)
    # safetensors: an 8-byte header length, a JSON header, then raw tensor bytes only
    data = (exported / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    assert len(data) == 8 + n + max(ends)
    assert header["embed.weight"]["dtype"] == "F32"


def test_model_card_and_config_say_what_it_is(exported, trained):
    conf = json.loads((exported / "config.json").read_text())
    assert conf["format"] == "sedd-ray" and conf["vocab_size"] == 300
    assert conf["source"]["checkpoint"] == trained.name and conf["source"]["step"] == 4
    assert {"val_nll", "val_nll_stderr"} <= set(conf["metrics"])
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sedd-ray")
    assert re.search(r"\| val_nll \| \d+\.\d{4} \| \d+\.\d{4} \|", card)
    assert "| model.hidden_size | 32 |" in card and "| diffusion.graph | absorb |" in card
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(exported))
    assert len(tok) == 300 and tok.decode(tok.encode("ROMEO: hi")) == "ROMEO: hi"


def test_export_of_the_best_trial_has_its_study_and_metrics(trained, tmp_path, capfd):
    storage = tmp_path / "results"
    w = R.ResultsWriter(storage, "graph-ablation")
    for i, nll in enumerate([3.5, 3.25]):
        w.upsert_trial({"trial_id": f"t{i}", "status": "terminated",
                        "config": tiny_config().to_dict(), "val_nll": nll,
                        "val_nll_stderr": 0.02, "test_nll": nll + 0.1, "test_nll_stderr": 0.03,
                        "checkpoint_path": str(trained)})
    w.close()
    out = tmp_path / "best"
    rc = export_cli.main(["--storage", str(storage), "--trial", "best", str(out)])
    assert rc == 0, capfd.readouterr().err
    conf = json.loads((out / "config.json").read_text())
    assert conf["source"]["study"] == "graph-ablation" and conf["source"]["trial_id"] == "t1"
    assert conf["metrics"]["val_nll"] == 3.25 and conf["metrics"]["test_nll_stderr"] == 0.03
    card = (out / "README.md").read_text()
    assert "study `graph-ablation`, trial `t1`" in card
    assert "| val_nll | 3.2500 | 0.0200 |" in card and "| test_nll | 3.3500 | 0.0300 |" in card


@pytest.mark.parametrize("tamper, match", [
    ("shape", r"weight 'blocks\.0\.qkv\.weight' has shape \(32, 96\), expected \(96, 32\)"),
    ("truncate", r"model\.safetensors: not a readable safetensors file"),
    ("missing", r"missing weight 'output_layer\.linear\.bias'"),
    ("extra", r"unexpected weight 'extra'"),
])
def test_tampered_weights_are_refused_with_one_line(tamper, match, exported, tmp_path, capfd):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    w = bad / "model.safetensors"
    if tamper == "truncate":
        data = w.read_bytes()
        w.write_bytes(data[: len(data) - 1000])
    else:
        state = load_file(str(w))
        if tamper == "shape":
            state["blocks.0.qkv.weight"] = state["blocks.0.qkv.weight"].T.contiguous()
        elif tamper == "missing":
            del state["output_layer.linear.bias"]
        else:
            state["extra"] = torch.zeros(3)
        save_file(state, str(w))
    with pytest.raises(hub.HubError, match=match) as e:
        ScoreModel.from_pretrained(str(bad))
    assert "\n" not in str(e.value)
    rc = sample_cli.main(["--checkpoint", str(bad), "--no-progress"])
    assert re.search(match, one_error_line(capfd, rc, 1))


def test_unknown_field_in_an_exports_config_is_refused(exported, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    conf = json.loads((bad / "config.json").read_text())
    conf["config"]["model"]["depth"] = 3
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(hub.HubError, match=r"unknown config key 'model\.depth'"):
        ScoreModel.from_pretrained(str(bad))


def test_sample_cli_on_an_exported_folder(exported, tmp_path, capfd):
    rc = sample_cli.main(["--checkpoint", str(exported), "--smoke-test", "--no-progress",
                          "--device", "cpu", "--jsonl", str(tmp_path / "s.jsonl")])
    out = capfd.readouterr().out
    assert rc == 0 and out.count("--- sample") == 2, out
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["step"] == 4


def test_export_to_a_non_empty_folder_is_refused(trained, tmp_path, capfd):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc = export_cli.main(["--checkpoint", str(trained), str(out)])
    line = one_error_line(capfd, rc, 2)
    assert re.search(r"taken exists and is not empty; pass --overwrite to replace it", line)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert export_cli.main(["--checkpoint", str(trained), str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temp folder left


def test_push_to_hub_without_credentials_is_refused(trained, tmp_path, capfd, monkeypatch):
    import huggingface_hub.constants as c

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    out = tmp_path / "out"
    rc = export_cli.main(["--checkpoint", str(trained), str(out), "--push-to-hub", "me/sedd"])
    line = one_error_line(capfd, rc, 2)
    assert "--push-to-hub needs Hugging Face credentials" in line
    assert not out.exists()


def test_push_to_hub_offline_never_shows_the_token(trained, tmp_path, capfd, monkeypatch):
    token = "hf_" + "Zq7" * 12
    monkeypatch.setenv("HF_TOKEN", token)
    out = tmp_path / "out"
    rc = export_cli.main(["--checkpoint", str(trained), str(out), "--push-to-hub", "me/sedd"])
    captured = capfd.readouterr()
    assert rc == 2 and "HF_HUB_OFFLINE is set" in captured.err
    assert token not in captured.err + captured.out
    assert not out.exists()
    rc = export_cli.main(["--checkpoint", str(trained), str(out), "--push-to-hub", "not a repo"])
    assert "is not a repo id" in one_error_line(capfd, rc, 2)


def test_fine_tune_starts_from_an_export(exported, tmp_path, tiny_bundle):
    from sedd_ray.trainer import Trainer

    t = Trainer(tiny_config(), tmp_path / "ft", bundle=tiny_bundle, init_from=str(exported))
    t._resume(False)
    pre = ScoreModel.from_pretrained(str(exported)).model.state_dict()
    for k, v in t.raw_model.state_dict().items():
        assert torch.equal(v, pre[k]) and torch.equal(t.ema.state_dict()[k], pre[k])
    assert t.step == 0 and not t.opt.state  # weights only: a fresh optimizer


def test_train_cli_init_from(exported, tmp_path, capfd):
    rc = train_cli.main([*TINY, "--no-ray", "--output", str(tmp_path / "ft"),
                         "--init-from", str(exported)])
    assert rc == 0, capfd.readouterr().err
    rc = train_cli.main([*TINY, "--hidden-size", "64", "--no-ray", "--output",
                         str(tmp_path / "ft2"), "--init-from", str(exported)])
    line = one_error_line(capfd, rc, 2)
    assert re.search(r"--init-from .*model: its model has hidden_size=32 but this run's has 64; "
                     r"pass --hidden-size 32", line), line
    assert not (tmp_path / "ft2").exists()


def test_train_init_from_another_tokenizer_is_refused(exported, tmp_path, tiny_bundle):
    from tokenizers import Tokenizer, models

    from sedd_ray.trainer import Trainer

    other = tmp_path / "other"
    shutil.copytree(exported, other)
    vocab = {f"w{i}": i for i in range(300)}
    (other / "tokenizer.json").write_text(Tokenizer(models.WordLevel(vocab, "w0")).to_str())
    t = Trainer(tiny_config(), tmp_path / "ft", bundle=tiny_bundle, init_from=str(other))
    with pytest.raises(hub.HubError, match=r"its tokenizer \(bpe, 300 tokens\) is not this "
                       r"run's"):
        t._resume(False)


class _FakeApi:
    """Stands in for ``huggingface_hub.HfApi``: records the calls; may fail like the Hub."""

    calls: list = []
    fail_with: str | None = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kw):
        _FakeApi.calls.append(("create_repo", repo_id, self.token, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        if _FakeApi.fail_with:
            raise RuntimeError(_FakeApi.fail_with)
        files = sorted(p.name for p in Path(folder_path).iterdir())
        _FakeApi.calls.append(("upload_folder", repo_id, self.token, files))


@pytest.mark.parametrize("fails", [False, True])
def test_push_to_hub_uploads_the_folder_and_never_shows_the_token(fails, trained, tmp_path,
                                                                  capfd, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants as c

    token = "hf_" + "Xy9" * 12
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    monkeypatch.setattr(_FakeApi, "calls", [])
    monkeypatch.setattr(_FakeApi, "fail_with", f"401 Unauthorized for token {token}" if fails
                        else None)
    out = tmp_path / "out"
    rc = export_cli.main(["--checkpoint", str(trained), str(out), "--push-to-hub", "me/sedd"])
    captured = capfd.readouterr()
    assert token not in captured.out + captured.err
    for p in out.iterdir():
        assert token not in p.read_text(errors="replace")
    assert _FakeApi.calls[0][:3] == ("create_repo", "me/sedd", token)
    if fails:
        line = captured.err.strip().splitlines()
        assert rc == 1 and len(line) == 1 and "401 Unauthorized for token ***" in line[0], line
        assert f"the folder is at {out}" in line[0]
    else:
        assert rc == 0 and "pushed to https://huggingface.co/me/sedd" in captured.out
        assert _FakeApi.calls[1] == ("upload_folder", "me/sedd", token, [
            "README.md", "config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"])
