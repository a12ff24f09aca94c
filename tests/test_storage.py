"""The storage layer against a real S3 API server (moto's, started by the ``s3`` fixture): every writer
round-trips through a URI, outputs appear only complete, and nothing this tool did not write is replaced."""

from __future__ import annotations

import functools
import json
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from lookahead_ray import storage
from lookahead_ray.config import DataConfig, LookaheadConfig, ModelConfig, PreviewConfig
from lookahead_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def prefix(s3) -> str:
    """A fresh prefix in the test bucket."""
    return f"{s3}/{uuid.uuid4().hex[:8]}"


def _objects(prefix: str) -> list[str]:
    return [f.removeprefix(prefix + "/") for f in storage.list_files(prefix)]


def test_locations_keep_their_scheme_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("s3://b/run/") == "s3://b/run"
    assert storage.absolute("run") == str(tmp_path / "run")
    assert storage.join("s3://b/run", "train", "final") == "s3://b/run/train/final"
    assert storage.parent("s3://b/run/train") == "s3://b/run" and storage.name("s3://b/run/train") == "train"
    fs, path = storage.resolve("s3://lookahead-test/run/checkpoint_0")
    assert fs.type_name == "s3" and path == "lookahead-test/run/checkpoint_0"
    with pytest.raises(ConfigError, match="options in the URI"):
        storage.resolve("s3://lookahead-test/run?endpoint_override=x")


def test_a_glob_over_a_bucket_matches_as_a_local_glob_does(prefix, tmp_path):
    for name in ("a.jsonl", "old/b.jsonl", ".hidden.jsonl", "old/deeper/c.jsonl", "notes.txt"):
        storage.write_text(f"{prefix}/data/{name}", "{}\n")
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_text("{}\n")
    for pattern in ("*.jsonl", "**/*.jsonl", "old/*.jsonl", "*/*/*.jsonl"):
        remote = [f.removeprefix(f"{prefix}/data/") for f in storage.glob(f"{prefix}/data/{pattern}")]
        local = [f.removeprefix(f"{tmp_path}/data/") for f in storage.glob(f"{tmp_path}/data/{pattern}")]
        assert remote == local, pattern
    assert storage.glob(f"{prefix}/data/*.jsonl") == [f"{prefix}/data/a.jsonl"]


def test_a_file_appears_whole_or_not_at_all(prefix):
    target = f"{prefix}/results.json"
    with pytest.raises(RuntimeError), storage.atomic_file(target) as f:
        f.write("{half")
        raise RuntimeError("interrupted")
    assert not storage.exists(target)  # nothing half-written reached the bucket
    storage.write_text(target, '{"ok": 1}\n')
    assert json.loads(storage.read_text(target)) == {"ok": 1}


def test_publish_replaces_only_marked_outputs_and_the_marker_comes_last(prefix, tmp_path, monkeypatch):
    target = f"{prefix}/final"
    for version in ("v1", "v2"):
        staging = tmp_path / version
        (staging / "sub").mkdir(parents=True)
        (staging / "weights.bin").write_text(version)
        (staging / "sub" / f"only-in-{version}.txt").write_text(version)
        (staging / "marker.yaml").write_text(version)
        storage.check_output_dir(target, "marker.yaml", "train.output_dir")
        uploads: list[str] = []
        recorded = functools.partial(_recording_upload, uploads, storage.upload_file)
        monkeypatch.setattr(storage.publish, "upload_file", recorded)  # where publish_dir calls it
        assert storage.publish_dir(staging, target, marker="marker.yaml") == target
        monkeypatch.undo()
        assert uploads[-1] == "marker.yaml"  # the output is complete only once everything else is there
        assert storage.is_complete(target, "marker.yaml")
        assert storage.read_text(f"{target}/weights.bin") == version
    assert sorted(_objects(target)) == ["marker.yaml", "sub/only-in-v2.txt", "weights.bin"]  # v1's files are gone
    assert not [f for f in storage.list_files(prefix) if ".tmp-" in f]  # staging prefixes removed

    with pytest.raises(ConfigError, match="a bucket's root"):
        storage.check_output_dir("s3://lookahead-test", "marker.yaml", "data.output_dir")
    foreign = f"{prefix}/theirs"
    storage.write_text(f"{foreign}/notes.txt", "not ours")
    with pytest.raises(ConfigError, match="did not write .no marker.yaml.; refusing to replace"):
        storage.check_output_dir(foreign, "marker.yaml", "train.output_dir")
    assert storage.read_text(f"{foreign}/notes.txt") == "not ours"


def _recording_upload(uploads: list[str], upload, local: str, remote: str) -> None:
    uploads.append(storage.name(remote))
    upload(local, remote)


def test_an_interrupted_publish_is_incomplete_and_ours_to_replace(prefix, tmp_path):
    target = f"{prefix}/prepared"
    storage.write_text(f"{target}/{storage.CLAIM}", "{}")  # what a publish killed midway leaves
    storage.write_text(f"{target}/part-0.parquet", "partial")
    storage.write_text(f"{target}/prepare_report.json", "{}")
    assert not storage.is_complete(target, "prepare_report.json")
    storage.check_output_dir(target, "prepare_report.json", "data.output_dir")  # ours: may be replaced
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "prepare_report.json").write_text("{}")
    storage.publish_dir(tmp_path / "new", target, marker="prepare_report.json")
    assert _objects(target) == ["prepare_report.json"] and storage.is_complete(target, "prepare_report.json")


def test_a_remote_directory_is_copied_once_per_node_and_again_when_it_changes(prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKAHEAD_RAY_CACHE", str(tmp_path / "cache"))
    storage.write_text(f"{prefix}/model/config.json", "{}")
    storage.write_text(f"{prefix}/model/model.safetensors", "weights")
    reads = []
    real_open = storage.open_input
    monkeypatch.setattr(storage.cache, "open_input",
                        lambda location, **kw: reads.append(location) or real_open(location, **kw))
    first = storage.local_copy(f"{prefix}/model", "models")
    assert Path(first, "config.json").read_text() == "{}" and len(reads) == 2
    assert storage.local_copy(f"{prefix}/model", "models") == first and len(reads) == 2  # cached: no download
    tokenizer_only = storage.local_copy(f"{prefix}/model", "tokenizers", weights=False)
    assert sorted(p.name for p in Path(tokenizer_only).iterdir()) == [".lookahead-complete", "config.json"]
    storage.write_text(f"{prefix}/model/config.json", '{"changed": true}')
    second = storage.local_copy(f"{prefix}/model", "models")
    assert second != first and json.loads(Path(second, "config.json").read_text()) == {"changed": True}
    with pytest.raises(FileNotFoundError, match="no such directory"):
        storage.local_copy(f"{prefix}/absent", "models")


@pytest.mark.usefixtures("ray_local")
def test_prepare_reads_inputs_from_the_bucket_and_its_write_tasks_write_the_shards_there(prefix):
    rows = [{"input": f"How much is {i} plus {i}?", "output": f"{i} plus {i} is {2 * i}."} for i in range(50)]
    storage.write_text(f"{prefix}/data/a.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:30]))
    storage.write_text(f"{prefix}/data/b.jsonl", "".join(json.dumps(r) + "\n" for r in rows[30:]))
    from lookahead_ray.data.pipeline import run_prepare
    from lookahead_ray.data.report import read_report

    cfg = LookaheadConfig(preview=PreviewConfig(mode="real", num_answer_tokens=3),
                          data=DataConfig(inputs=[f"{prefix}/data/*.jsonl"], output_dir=f"{prefix}/prepared",
                                          rows_per_shard=20),
                          model=ModelConfig(tokenizer="builtin:tiny"))
    report = run_prepare(cfg)
    assert (report.rows_read, report.rows_written, report.rows_rejected) == (50, 50, 0)
    assert report.input_files == [f"{prefix}/data/a.jsonl", f"{prefix}/data/b.jsonl"]
    assert report.output_dir == f"{prefix}/prepared" and read_report(report.output_dir)["rows_written"] == 50
    shards = [f for f in storage.list_files(f"{prefix}/prepared") if f.endswith(".parquet")]
    assert sorted(storage.name(s) for s in shards) == sorted(report.shards)
    fs, _ = storage.resolve(prefix)
    written = sum(pq.read_table(storage.resolve(s)[1], filesystem=fs).num_rows for s in shards)
    assert written == 50
    assert run_prepare(cfg).rows_written == 50  # a rerun replaces its own marked output
    assert not [f for f in storage.list_files(prefix) if ".tmp-" in f]

    storage.write_text(f"{prefix}/foreign/keep.txt", "not ours")
    from dataclasses import replace

    with pytest.raises(ConfigError, match="refusing to replace"):
        run_prepare(replace(cfg, data=replace(cfg.data, output_dir=f"{prefix}/foreign")))


def test_training_rows_from_a_bucket_come_in_the_canonical_order_the_old_token_file_had(prefix, tmp_path,
                                                                                          monkeypatch):
    """The rows a worker trains on, from s3:// or a local directory: the order the single token file built on
    the driver had (every shard concatenated, sorted by input file and row), without building it."""
    import pyarrow as pa

    from lookahead_ray.train.data_order import SORT_KEYS, TokenStore

    monkeypatch.setenv("LOOKAHEAD_RAY_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "prepared"
    local.mkdir()
    rng = __import__("random").Random(0)
    keys = [(f"/data/{name}.jsonl", row) for name in ("b", "a", "c") for row in range(1, 40)]
    rng.shuffle(keys)  # rows spread over shards in no order, as Ray's write tasks spread them
    shards = []
    for number, start in enumerate(range(0, len(keys), 25)):
        part = keys[start:start + 25]
        pq.write_table(pa.table({"source_file": [f for f, _ in part], "source_row": [r for _, r in part],
                                 "input_ids": [[1000 * "abc".index(f[-7]) + r, r] for f, r in part],  # distinct
                                 "attention_mask": [[1, 1] for _ in part], "labels": [[-100, r] for _, r in part]}),
                       local / f"part-{9 - number}.parquet")
        shards.append(f"part-{9 - number}.parquet")
    (local / "prepare_report.json").write_text(json.dumps({"shards": shards, "rows_written": len(keys)}))
    storage.upload_dir(local, f"{prefix}/prepared")
    old = pa.concat_tables(pq.read_table(local / s) for s in sorted(shards)).sort_by(SORT_KEYS)
    expected = old.select(["input_ids", "attention_mask", "labels"]).to_pydict()
    indices = list(range(len(keys)))
    remote, here = TokenStore(f"{prefix}/prepared"), TokenStore(str(local))
    assert len(remote) == len(here) == len(keys)
    assert remote.batch(indices) == here.batch(indices) == expected
    assert remote.batch([5, 0]) == {k: [v[5], v[0]] for k, v in expected.items()}
    assert len([p for p in (tmp_path / "cache" / "tokens").iterdir() if not p.name.startswith(".")]) == 2


def test_preview_reads_and_writes_uris(prefix, tiny_tokenizer):
    from lookahead_ray.data.preview_file import run_preview_file

    rows = [{"question": f"What is {i} + 1?", "answer": f"It is {i + 1}."} for i in range(5)]
    storage.write_text(f"{prefix}/in.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cfg = LookaheadConfig.from_dict({"preview": {"mode": "virtual"},
                                     "records": {"instruction_field": "question", "answer_field": "answer"}})
    stats = run_preview_file(cfg, f"{prefix}/in.jsonl", f"{prefix}/out.jsonl", "jsonl", "jsonl", workers=1)
    assert stats.rows == 5
    out = [json.loads(line) for line in storage.read_text(f"{prefix}/out.jsonl").splitlines()]
    assert out[0]["answer"] == "Let's solve this problem. It is 1."
    assert out[0]["question"].endswith(" The answer begins with: Let's solve this problem. ")


def test_tune_tables_and_best_yaml_round_trip_through_a_uri(prefix):
    from lookahead_ray.config import load_config
    from lookahead_ray.tune.results import write_results

    cfg = load_config(REPO / "configs" / "tune_tiny_cpu.yaml")
    metrics = {"rsr": {"keyword": {"safe_rate": 0.8}}, "jsr": {"keyword": {"safe_rate": 0.6}},
               "utility": {"score": 0.5}}
    trials = [{"trial_id": "t1", "label": "real m=2", "status": "TERMINATED", "overrides": {"preview.num_answer_tokens": 2},
               "metrics": metrics, "objective": 0.5, "feasible": True, "safety": 0.7, "utility": 0.5}]
    best = write_results(f"{prefix}/search", cfg, trials, metrics)
    assert best == f"{prefix}/search/best.yaml"
    assert sorted(_objects(f"{prefix}/search")) == ["best.yaml", "pareto.png", "trials.csv", "trials.md"]
    assert yaml.safe_load(storage.read_text(best))["preview"]["num_answer_tokens"] == 2
    assert "real m=2" in storage.read_text(f"{prefix}/search/trials.md")
    assert storage.read_bytes(f"{prefix}/search/pareto.png")[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_run_resumes_from_a_checkpoint_in_the_bucket(ray_local, prefix, tmp_path):
    from test_training import _cfg

    from lookahead_ray.train.execute import run_training, run_training_local

    first = run_training_local(_cfg(tmp_path, "train.max_steps=8", "train.run_name=short"))
    storage.upload_dir(first.checkpoint_dir, f"{prefix}/checkpoint")
    longer = run_training(_cfg(tmp_path, "train.max_steps=12", "train.run_name=longer", "train.num_workers=1",
                               f"train.resume_from={prefix}/checkpoint"))
    assert longer.metrics["resumed_from_step"] == 8 and longer.metrics["step"] == 12
