"""The token store: sources, a parallel and resumable build, checks on read, streaming
training with exact resume, and bad input (one clear line, nothing written)."""

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from sedd_ray import checkpoint as ckpt
from sedd_ray import store as st
from sedd_ray.config import ConfigError, DataConfig
from sedd_ray.data import DataError, load_data
from sedd_ray.layout import TrainerFiles
from sedd_ray.trainer import train

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his "
         "from at which but have an they you were her she there one all we their").split()


def _doc(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200)))


def make_corpus(root: Path, seed: int = 0, docs: int = 300) -> Path:
    """About 1.5 MB: two .jsonl (one gzipped), one .parquet and eight .txt files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.jsonl").write_text("".join(json.dumps({"text": _doc(rng), "id": i}) + "\n"
                                          for i in range(docs)))
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": _doc(rng)}) + "\n" for _ in range(docs))
    pq.write_table(pa.table({"text": [_doc(rng) for _ in range(docs)]}), root / "c.parquet",
                   row_group_size=64)
    for i in range(8):
        (root / f"t{i}.txt").write_text("\n\n".join(_doc(rng) for _ in range(20)))
    return root


def data_cfg(tmp: Path, corpus: str, **kw) -> DataConfig:
    base = dict(corpus=corpus, vocab_size=300, seq_len=32, shard_tokens=20_000,
                tokenize_workers=1, cache_dir=str(tmp / "cache"), tokenizer_sample_mb=1)
    base.update(kw)
    return DataConfig(**base)


def shard_bytes(uri: str) -> dict[str, bytes]:
    root = Path(uri.removeprefix("file://"))
    return {p.name: p.read_bytes() for p in sorted((root / "shards").glob("*.bin"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    """The jsonl files built with two worker processes."""
    tmp = tmp_path_factory.mktemp("built")
    cfg = data_cfg(tmp, f"jsonl:{corpus}/*.jsonl*", tokenize_workers=2)
    return cfg, load_data(cfg)


# --- building --------------------------------------------------------------------------------

def test_build_is_sharded_and_the_same_for_any_number_of_workers(built, tmp_path):
    cfg, bundle = built
    index = json.loads((Path(bundle.meta["store"]) / "index.json").read_text())
    assert len(index["shards"]) >= 4 and len(index["corpus"]["parts"]) == 2
    counts = index["counts"]
    assert counts["train"]["docs"] + counts["val"]["docs"] + counts["test"]["docs"] == 600
    assert 0 < counts["val"]["docs"] < 0.15 * 600  # about val_fraction 0.05 of documents
    # EOS closes every document of each split, and the ids fit the vocabulary
    arrays = st.TokenStore.open(bundle.meta["store"], tmp_path).arrays("train")
    stream = np.concatenate(arrays)
    assert stream.dtype == np.uint16 and stream.max() < bundle.vocab_size
    assert int((stream == bundle.eos_id).sum()) == counts["train"]["docs"]
    assert bundle.decode(stream[: list(stream).index(bundle.eos_id)]).split()[0] in WORDS
    one = load_data(data_cfg(tmp_path, cfg.corpus, tokenize_workers=1))
    assert not one.meta["cache_hit"] and one.meta["store"] != bundle.meta["store"]
    assert shard_bytes(one.meta["store"]) == shard_bytes(bundle.meta["store"])
    again = load_data(cfg)
    assert again.meta["cache_hit"] and again.meta["store"] == bundle.meta["store"]


def test_parquet_and_txt_sources(corpus, tmp_path):
    pq = load_data(data_cfg(tmp_path, f"parquet:{corpus}/*.parquet:text"))
    assert pq.meta["n_documents"] == 300 and pq.meta["store_shards"] >= 2
    txt = load_data(data_cfg(tmp_path, f"txt:{corpus}/t*.txt", val_fraction=0.3,
                             test_fraction=0.3, seq_len=8))
    assert txt.meta["n_documents"] == 8  # one document a file
    assert txt.val.shape[1] == 8 and len(txt.val) > 0


def test_split_by_document_is_seeded_and_documented(built, tmp_path):
    cfg, bundle = built
    assert bundle.meta["split"] == {"method": "hold-out by document", "seed": 0,
                                    "val_fraction": 0.05, "test_fraction": 0.05}
    part = st.sources.Part("jsonl", "x", 10_000, 1)
    rule = bundle.meta["split"]
    codes = st.split_codes(rule, part, 0, 0, 10_000)
    assert abs((codes == 1).mean() - 0.05) < 0.01 and abs((codes == 2).mean() - 0.05) < 0.01
    assert np.array_equal(codes[100:200], st.split_codes(rule, part, 0, 100, 200))
    other = st.split_codes({**rule, "seed": 1}, part, 0, 0, 10_000)
    assert not np.array_equal(codes, other)


def test_killed_build_resumes_keeping_finished_shards(corpus, tmp_path):
    cfg = data_cfg(tmp_path, f"jsonl:{corpus}/a.jsonl", shard_tokens=1_000,
                   store_dir=str(tmp_path / "stores"))
    code = ("import sys; from sedd_ray.config import DataConfig; from sedd_ray import store; "
            f"store.build_store(DataConfig(**{cfg.__dict__!r}))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.time() + 120
        while len(list((tmp_path / "stores").glob("*/shards/*.json"))) < 3:
            assert proc.poll() is None and time.time() < deadline, "the build ended early"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    (store_dir,) = (tmp_path / "stores").iterdir()
    assert not (store_dir / "index.json").exists()
    finished = len(list(store_dir.glob("shards/*.json")))
    uri = st.build_store(cfg)
    index = json.loads((Path(uri) / "index.json").read_text())
    assert index["reused_shards"] >= finished - 1 >= 2  # (one may be mid-rename)
    fresh = st.build_store(data_cfg(tmp_path, cfg.corpus, shard_tokens=1_000,
                                    store_dir=str(tmp_path / "fresh")))
    assert shard_bytes(uri) == shard_bytes(fresh)
    assert not list(Path(uri).rglob("*.tmp"))


# --- reading and training -----------------------------------------------------------------------

def test_stream_draws_depend_only_on_seed_and_sample(built):
    _, bundle = built
    a, b = bundle.train_source(3), bundle.train_source(3)
    assert torch.equal(a.rows(0, 8), torch.cat([b.rows(0, 4), b.rows(4, 4)]))
    assert torch.equal(a.rows(100, 4), b.rows(100, 4))
    assert not torch.equal(a.rows(0, 8), bundle.train_source(4).rows(0, 8))
    rows = a.rows(0, 4000)
    assert rows.shape == (4000, 32) and rows.dtype == torch.long
    shards = np.searchsorted(a.cum, (st._mix(3, 7, np.arange(4000, dtype=np.uint64))
                                     % np.uint64(a.total)).astype(np.int64), side="right")
    assert len(set(shards.tolist())) == len(a.arrays)  # every shard is drawn from


def _weights(path):
    state, _ = ckpt.load_checkpoint(path)
    return {**state["model"], **{f"ema.{k}": v for k, v in state["ema"].items()}}


class Stop(Exception):
    pass


def test_training_from_the_store_resumes_bitwise(built, tmp_path):
    cfg_data, bundle = built
    cfg = tiny_config(steps=12, ckpt_every=6, eval_every=6, log_every=2, batch_size=4,
                      corpus=cfg_data.corpus, cache_dir=cfg_data.cache_dir,
                      shard_tokens=cfg_data.shard_tokens, tokenize_workers=2,
                      tokenizer_sample_mb=1)
    full = train(cfg, tmp_path / "full")
    assert full.data_meta["store"] == bundle.meta["store"] and full.data_meta["cache_hit"]

    def crash(metrics, checkpoint_dir):
        if checkpoint_dir is not None:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, tmp_path / "part", crash)
    resumed = train(cfg, tmp_path / "part")
    assert resumed.resumed_from_step == 6

    def curve(run):
        rows = [json.loads(line) for line in TrainerFiles(tmp_path / run).metrics.open()]
        return [(m["step"], m["train_loss"], m["epochs"]) for m in rows if "train_loss" in m]

    assert curve("part") == curve("full") and len(curve("full")) == 6
    assert curve("full")[-1][2] == pytest.approx(12 * 4 * 32 / bundle.stream.n_tokens)
    wa, wb = _weights(full.checkpoint_dir), _weights(resumed.checkpoint_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_trials_share_one_store_built_once(built, tmp_path, capsys):
    """A study loads the data once on the driver (study._precheck_data); its trials,
    whatever their training seed, then read that same store without building."""
    cfg_data, bundle = built
    index = Path(bundle.meta["store"]) / "index.json"
    before = index.stat().st_mtime_ns
    metas = []
    for seed in (0, 1):
        cfg = tiny_config(steps=2, eval_every=2, ckpt_every=2, seed=seed,
                          corpus=cfg_data.corpus, cache_dir=cfg_data.cache_dir,
                          shard_tokens=cfg_data.shard_tokens, tokenizer_sample_mb=1)
        metas.append(train(cfg, tmp_path / f"trial{seed}").data_meta)
    assert {m["store"] for m in metas} == {bundle.meta["store"]}
    assert all(m["cache_hit"] for m in metas) and index.stat().st_mtime_ns == before
    out = capsys.readouterr().out
    assert out.count("estimate: ") == 2 and "epochs of" in out


def test_file_uri_store_dir_and_store_corpus(corpus, tmp_path):
    cfg = data_cfg(tmp_path, f"jsonl:{corpus}/a.jsonl", store_dir=f"file://{tmp_path}/s")
    bundle = load_data(cfg)
    assert bundle.meta["store"].startswith(str(tmp_path / "s"))
    direct = load_data(data_cfg(tmp_path, f"store:file://{bundle.meta['store']}"))
    assert torch.equal(direct.val, bundle.val)
    assert torch.equal(direct.train_source(0).rows(0, 5), bundle.train_source(0).rows(0, 5))


def test_remote_store_is_copied_into_the_node_cache(built, tmp_path, monkeypatch):
    """A store on another filesystem (here: a pyarrow SubTreeFileSystem, standing for S3)
    is fetched shard by shard into <cache>/store-cache once, then reused."""
    import pyarrow.fs as pafs

    _, bundle = built
    root = Path(bundle.meta["store"])
    sub = pafs.SubTreeFileSystem(str(root.parent), pafs.LocalFileSystem())
    monkeypatch.setattr(st, "filesystem", lambda uri: (sub, root.name, False))
    opened = st.TokenStore.open("mem://bucket/" + root.name, tmp_path / "cache")
    copies = list((tmp_path / "cache" / "store-cache").rglob("*.bin"))
    assert len(copies) == 3 * len(opened.index["shards"])
    assert np.array_equal(np.concatenate(opened.arrays("train")),
                          np.concatenate(st.TokenStore.open(str(root), tmp_path).arrays("train")))


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    rng = random.Random(1)
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(
        {"text": [_doc(rng) for _ in range(n)], "n": list(range(n))})
        for s, n in (("train", 200), ("validation", 30), ("test", 30))})
    dd.save_to_disk(tmp_path / "dd")
    given = load_data(data_cfg(tmp_path, f"hf:{tmp_path / 'dd'}"))
    assert given.meta["split"] == {"method": "given"}
    assert given.meta["n_segments"] == {"train": 200, "val": 30, "test": 30}
    one = load_data(data_cfg(tmp_path, f"hf:{tmp_path / 'dd'}:train"))
    assert one.meta["split"]["method"] == "hold-out by document"
    assert sum(one.meta["n_segments"].values()) == 200
    with pytest.raises(DataError, match="no field 'content'"):
        load_data(data_cfg(tmp_path, f"hf:{tmp_path / 'dd'}", text_field="content"))


def test_a_built_store_is_found_without_loading_the_dataset_again(tmp_path, monkeypatch,
                                                                   corpus):
    """A trial's worker on another node finds the driver's store through its note and
    never loads the Hugging Face dataset; a file corpus whose files changed is rebuilt."""
    import datasets

    datasets.Dataset.from_dict({"text": [_doc(random.Random(i)) for i in range(100)]}
                               ).save_to_disk(tmp_path / "ds")
    cfg = data_cfg(tmp_path, f"hf:{tmp_path / 'ds'}")
    built = load_data(cfg)
    st.sources._hf_load.cache_clear()
    monkeypatch.setattr(st.sources, "_hf_load", lambda *a: pytest.fail("dataset loaded"))
    again = load_data(cfg)
    assert again.meta["store"] == built.meta["store"] and again.meta["cache_hit"]
    monkeypatch.undo()
    files = tmp_path / "files"
    files.mkdir()
    (files / "a.jsonl").write_bytes((corpus / "a.jsonl").read_bytes())
    first = load_data(data_cfg(tmp_path, f"jsonl:{files}/*.jsonl"))
    with open(files / "a.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    second = load_data(data_cfg(tmp_path, f"jsonl:{files}/*.jsonl"))
    assert second.meta["store"] != first.meta["store"] and not second.meta["cache_hit"]
    assert second.meta["n_documents"] == first.meta["n_documents"] + 1


# --- bad input ---------------------------------------------------------------------------------

def _nothing_written(tmp_path):
    assert not (tmp_path / "cache" / "stores").exists()


@pytest.mark.parametrize("spec, match", [
    ("jsonl:{tmp}/missing/*.jsonl", "does not exist"),
    ("jsonl:{tmp}/empty/*.jsonl", "matches no"),
    ("jsonl:{tmp}/blank.jsonl", "is empty"),
    ("jsonl:{corpus}/a.jsonl:body", "has no field 'body'"),
    ("parquet:{corpus}/c.parquet:body", "has no field 'body'"),
    ("hf:{tmp}/nothing-here", "could not be loaded"),
])
def test_bad_sources_fail_before_any_write(corpus, tmp_path, spec, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.jsonl").write_text("")
    spec = spec.format(tmp=tmp_path, corpus=corpus)
    with pytest.raises(DataError, match=match) as err:
        load_data(data_cfg(tmp_path, spec))
    assert "\n" not in str(err.value)
    _nothing_written(tmp_path)


def test_truncated_or_corrupted_shard_is_refused_by_name(corpus, tmp_path):
    bundle = load_data(data_cfg(tmp_path, f"jsonl:{corpus}/a.jsonl"))
    shard = Path(bundle.meta["store"]) / "shards" / "00001.train.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(st.StoreError, match=r"shard shards/00001.train.bin is truncated"):
        load_data(data_cfg(tmp_path, f"jsonl:{corpus}/a.jsonl"))
    shard.write_bytes(data[:-2] + b"\xff\xff")
    with pytest.raises(st.StoreError, match=r"shards/00001.train.bin does not match its"):
        load_data(data_cfg(tmp_path, f"jsonl:{corpus}/a.jsonl"))


def test_store_of_another_tokenizer_is_refused(built, tmp_path):
    _, bundle = built
    with pytest.raises(st.StoreError, match="built with the bpe tokenizer .* --vocab-size 300"):
        load_data(data_cfg(tmp_path, f"store:{bundle.meta['store']}", vocab_size=512))
    with pytest.raises(st.StoreError, match="asks for gpt2"):
        load_data(data_cfg(tmp_path, f"store:{bundle.meta['store']}", tokenizer="gpt2"))
    with pytest.raises(st.StoreError, match="no token store at"):
        load_data(data_cfg(tmp_path, f"store:{tmp_path}/none"))


def test_vocabulary_too_large_for_uint16_needs_the_switch(corpus, tmp_path):
    with pytest.raises(ConfigError, match="set --set data.token_dtype=uint32"):
        data_cfg(tmp_path, f"jsonl:{corpus}/a.jsonl", vocab_size=70_000).validate()
    data_cfg(tmp_path, f"jsonl:{corpus}/a.jsonl", vocab_size=70_000,
             token_dtype="uint32").validate()
    with pytest.raises(st.StoreError, match="does not fit uint16"):
        st._check_dtype(data_cfg(tmp_path, "jsonl:x"), 70_000)
    _nothing_written(tmp_path)


def test_cli_bad_corpus_is_one_error_line(tmp_path, capfd):
    """``train --no-ray`` turns a data error into one ``error:`` line and exit code 1 (as
    for every corpus, tests/test_bad_input.py), before any folder is made."""
    from sedd_ray import train as train_cli

    rc = train_cli.main(["--smoke-test", "--no-ray", "--corpus", f"jsonl:{tmp_path}/no/*.jsonl",
                         "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "out")])
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: corpus jsonl:"), lines
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_store_cli_smoke_test_and_bad_corpus(tmp_path, capfd):
    assert st.main(["--smoke-test"]) == 0
    out = capfd.readouterr().out
    assert "store: " in out and "shards" in out and out.count("estimate: ") == 1
    assert st.main(["--corpus", "shakespeare", "--cache-dir", str(tmp_path / "c")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.corpus 'shakespeare' is not a store")
    assert not (tmp_path / "c").exists()


@pytest.mark.ray
def test_a_study_builds_its_store_once_and_every_trial_reads_it(corpus, tmp_path):
    """A real study on a jsonl corpus: the driver builds the store before any trial starts
    (no shard is written after the first trial's start), and both trials, with different
    training seeds, are measured on the one data identity."""
    import ray

    from sedd_ray.results import read_trials
    from sedd_ray.study import Choice, StudySpec, run_study

    fixed = {"steps": 4, "log_every": 2, "eval_every": 4, "ckpt_every": 4, "seq_len": 32,
             "corpus": f"jsonl:{corpus}/*.jsonl*", "vocab_size": 300, "shard_tokens": 20_000,
             "tokenize_workers": 1, "tokenizer_sample_mb": 1, "cache_dir": str(tmp_path / "cache"),
             "batch_size": 4, "eval_sequences": 4, "eval_draws": 1, "final_eval_sequences": 8,
             "final_eval_draws": 1, "test_draws": 0, "sample_count": 1, "sample_steps": 2,
             "sample_length": 8, "hidden_size": 32, "cond_dim": 16, "n_layers": 1,
             "progress": False}
    spec = StudySpec(name="store-study", base="tiny", fixed=fixed, space={"lr": Choice([1e-3])},
                     seeds=[0, 1], num_trials=2, max_concurrent=2)
    ray.init(address="local", num_cpus=2, resources={"sedd_driver": 1000})
    try:
        run_study(spec, str(tmp_path / "studies"), verbose=0)
    finally:
        ray.shutdown()
    trials = read_trials(tmp_path / "studies", "store-study")
    assert (trials["status"] == "terminated").all() and sorted(trials["seed"]) == [0, 1]
    assert trials["data_identity"].nunique() == 1
    indexes = list((tmp_path / "cache").rglob("index.json"))
    assert len(indexes) == 1  # one store for the study
    last_write = max(p.stat().st_mtime for p in indexes[0].parent.rglob("*") if p.is_file()
                     and p.parent.name == "shards")
    assert last_write < trials["start_time"].min().timestamp()
