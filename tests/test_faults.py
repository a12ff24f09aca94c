"""Faults a person can act on (issue 23): one clear line on the console, exit 2, nothing lost or left behind.
Each case runs the CLI as a user does (a subprocess joined to the tests' local Ray)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Ray's C++ core worker writes its own log lines straight to the driver's stderr (not through Python logging).
RAY_CORE_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [EWI] \d+ \d+\] ")


def run_cli(args: list[str], ray_address: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "lookahead_ray", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def console_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line and not RAY_CORE_LOG.match(line)]


def _rows(n: int = 30) -> list[bytes]:
    return [json.dumps({"input": f"What is {i} plus {i}?", "output": f"It is {2 * i}."}).encode() for i in range(n)]


@pytest.mark.parametrize(("case", "bad_row", "expected"), [
    ("null answer", json.dumps({"input": "q", "output": None}).encode(),
     "row 18, field 'output': not_a_string: expected a string, got NoneType"),
    ("latin-1 bytes", b'{"input": "caf\xe9", "output": "x"}', "row 18: invalid_utf8"),
    ("prompt too long", json.dumps({"input": "word " * 400, "output": "x"}).encode(),
     "row 18: prompt_too_long: prompt is"),
])
def test_a_bad_row_raised_inside_ray_data_is_one_line_naming_file_row_and_field(ray_local, tmp_path, case, bad_row,
                                                                                 expected):
    rows = _rows()
    rows[17] = bad_row
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b"\n".join(rows) + b"\n")
    out = tmp_path / "prepared"
    result = run_cli(["prepare", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), f"data.inputs=[{data}]",
                      "data.on_error=fail", f"data.output_dir={out}"], ray_local.get_runtime_context().gcs_address,
                     tmp_path)
    lines = console_lines(result)
    assert result.returncode == 2, result.stderr
    assert lines == [f"lookahead-ray prepare: error: {data}, {lines[0].split(f'{data}, ', 1)[-1]}"], lines
    assert expected in lines[0] and "Traceback" not in result.stderr
    assert not out.exists()  # nothing written, nothing staged beside it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]


def test_a_second_run_into_an_output_another_live_run_holds_fails_at_once_naming_it(tmp_path):
    import socket

    from lookahead_ray import storage

    data = tmp_path / "rows.jsonl"
    data.write_bytes(b"\n".join(_rows()) + b"\n")
    out = tmp_path / "prepared"
    with storage.held_output(str(out), "data.output_dir"):  # the first run (this process) is still writing
        lock = json.loads(Path(storage.lock_location(str(out))).read_text())
        assert lock["host"] == socket.gethostname() and lock["pid"] == os.getpid()
        result = run_cli(["prepare", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), f"data.inputs=[{data}]",
                          f"data.output_dir={out}"], "127.0.0.1:1", tmp_path)  # refused before any Ray address is used
    assert result.returncode == 2
    assert console_lines(result) == [
        f"lookahead-ray prepare: error: data.output_dir: {out} is being written by another run (host "
        f"{socket.gethostname()}, pid {os.getpid()}, since {lock['started']}: {lock['command']}); wait for it or "
        f"choose another location. If that run is gone, delete {storage.lock_location(str(out))}"]
    assert not out.exists() and not Path(storage.lock_location(str(out))).exists()  # released by its holder


def test_a_lock_left_by_a_dead_run_is_taken_over_and_released(ray_local, tmp_path):
    import socket

    from lookahead_ray import storage

    data = tmp_path / "rows.jsonl"
    data.write_bytes(b"\n".join(_rows()) + b"\n")
    out = tmp_path / "prepared"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = Path(storage.lock_location(str(out)))
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "earlier",
                                "token": "gone", "command": "lookahead-ray prepare (killed)"}))
    leftover = tmp_path / ".prepared.tmp-0123456789ab"  # the killed run's staging, with a partial shard
    leftover.mkdir()
    (leftover / "part-0.parquet").write_bytes(b"PAR1 partial")
    foreign = tmp_path / ".prepared.tmp-mine"  # not a name this tool makes: never touched
    foreign.mkdir()
    result = run_cli(["prepare", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), f"data.inputs=[{data}]",
                      f"data.output_dir={out}"], ray_local.get_runtime_context().gcs_address, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (out / "prepare_report.json").is_file() and not lock.exists()
    assert not leftover.exists() and foreign.is_dir()
    assert "removed 1 staging location(s) left by an interrupted run" in result.stderr


def _compressed_inputs(directory: Path) -> int:
    """A directory of the inputs users have: gzip JSONL, zstd JSON, and JSONL with a byte order mark."""
    import gzip

    import pyarrow as pa

    directory.mkdir()
    rows = _rows(12)
    (directory / "a.jsonl.gz").write_bytes(gzip.compress(b"\n".join(rows[:5]) + b"\n"))
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as stream:
        stream.write(("[" + ",".join(r.decode() for r in rows[5:9]) + "]").encode())
    (directory / "b.json.zst").write_bytes(sink.getvalue().to_pybytes())
    (directory / "c.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(rows[9:]) + b"\n")
    return len(rows)


def test_compressed_and_bom_inputs_are_read_with_their_row_numbers(ray_local, tmp_path):
    from lookahead_ray.config import load_config
    from lookahead_ray.data.pipeline import run_prepare

    rows = _compressed_inputs(tmp_path / "inputs")
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", [f"data.inputs=[{tmp_path / 'inputs'}]",
                                                           f"data.output_dir={tmp_path / 'prepared'}",
                                                           "data.on_error=fail"])
    report = run_prepare(cfg)
    assert report.rows_read == rows and report.rows_written == rows


def test_preview_reads_a_gzip_file_with_a_bom_and_names_a_bad_row_by_its_line(tmp_path):
    import gzip

    from lookahead_ray.cli import main

    rows = _rows(6)
    rows[0] = b"\xef\xbb\xbf" + rows[0]
    good = tmp_path / "rows.jsonl.gz"
    good.write_bytes(gzip.compress(b"\n".join(rows) + b"\n"))
    out = tmp_path / "out.jsonl"
    config = str(REPO / "configs" / "tiny_cpu.yaml")
    assert main(["preview", "--config", config, "--input_file", str(good), "--output_file", str(out),
                 "--input_format", "jsonl", "--output_format", "jsonl"]) == 0
    assert len(out.read_text().splitlines()) == 6
    rows[3] = b'{"input": "q", "output": '
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b"\n".join(rows) + b"\n"))
    with pytest.raises(Exception, match=r"bad.jsonl.gz.*(row|line) 4"):
        from lookahead_ray.config import load_config
        from lookahead_ray.data.preview_file import run_preview_file

        run_preview_file(load_config(config), str(bad), str(tmp_path / "out2.jsonl"), "jsonl", "jsonl")


def _preview_args(input_file: Path, output: Path, *overrides: str, config: Path | None = None) -> list[str]:
    return ["preview", "--config", str(config or REPO / "configs" / "tiny_cpu.yaml"), "--input_file", str(input_file),
            "--output_file", str(output), "--input_format", "jsonl", "--output_format", "jsonl", *overrides]


def _in_own_mounts(mounts: list[tuple[str, Path]], args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a mount namespace of its own with small tmpfs mounts (a full disk, a read-only one)."""
    import shlex
    import shutil

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a tmpfs (CI runs as root)")
    script = " && ".join([*(f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(path))}" for options, path in mounts),
                          shlex.join([sys.executable, "-m", "lookahead_ray", *args])])
    return subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)


def test_a_full_disk_and_a_read_only_one_are_one_line_each_and_leave_nothing(tmp_path):
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"input": f"What is {i} plus {i}? " * 5, "output": f"It is {2 * i}. " * 5})
                            + "\n" for i in range(600)))  # its preview is ~250 KB
    full, read_only = tmp_path / "full", tmp_path / "read_only"
    full.mkdir(), read_only.mkdir()
    result = _in_own_mounts([("size=32k", full)], _preview_args(data, full / "out.jsonl"), tmp_path)
    assert result.returncode == 2, result.stderr
    assert console_lines(result) == [f"lookahead-ray preview: error: no space left on the device: {full}/out.jsonl; "
                                     "free space there (or write elsewhere) and rerun"]
    result = _in_own_mounts([("ro", read_only)], _preview_args(data, read_only / "out.jsonl"), tmp_path)
    assert result.returncode == 2, result.stderr
    assert console_lines(result) == [f"lookahead-ray preview: error: the file system is read-only: {read_only}/out.jsonl;"
                                     " write the output somewhere writable"]
    config = str(REPO / "configs" / "tiny_cpu.yaml")
    for command, output in (["prepare", f"data.output_dir={read_only}/prepared"],
                            ["train", f"train.output_dir={read_only}/train"]):  # refused before Ray starts
        result = _in_own_mounts([("ro", read_only)], [command, "--config", config, f"data.inputs=[{data}]", output],
                                tmp_path)
        assert result.returncode == 2, result.stderr
        assert console_lines(result) == [f"lookahead-ray {command}: error: the file system is read-only: "
                                         f"{read_only}/{output.split('/')[-1]}; write the output somewhere writable"]


def test_config_mistakes_name_the_command_line_or_the_file_line(tmp_path):
    from lookahead_ray.cli import main

    data = REPO / "examples" / "sample_tasks.jsonl"
    command = ["prepare", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "preview.mdoe=real"]
    result = subprocess.run([sys.executable, "-m", "lookahead_ray", *command], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 2 and console_lines(result) == [
        "lookahead-ray prepare: error: override preview.mdoe=...: unknown key 'mdoe' in preview (known: "
        "adaptive_nll_threshold, connector, exact_span, mix_plain_share, mix_seed, mode, num_answer_tokens, "
        "virtual_prefix)"]
    assert main(_preview_args(data, tmp_path)) == 2  # the output names a directory
    broken = tmp_path / "broken.yaml"
    broken.write_text("preview:\n  mode: real\n num_answer_tokens: [\n")
    with pytest.raises(Exception, match=rf"{broken}, line 3, column 2: not valid YAML"):
        from lookahead_ray.config import load_config

        load_config(broken)


def test_inputs_that_give_no_rows_are_named_and_a_truncated_parquet_names_its_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lookahead_ray.config import DataConfig
    from lookahead_ray.data.readers import expand_inputs
    from lookahead_ray.errors import ConfigError, RowError

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "rows.jsonl").write_bytes(b"\n".join(_rows(3)) + b"\n")
    (inputs / "notes.txt").write_text("not data")
    (inputs / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"files of no known type are not read: .*notes.txt \(data.on_error is fail"):
        expand_inputs(DataConfig(inputs=[str(inputs)]))
    with pytest.raises(ConfigError, match=r"empty file\(s\), no rows: .*empty.jsonl"):
        expand_inputs(DataConfig(inputs=[str(inputs / "rows.jsonl"), str(inputs / "empty.jsonl")]))
    assert len(expand_inputs(DataConfig(inputs=[str(inputs)], on_error="skip"))) == 2  # warned, read

    table = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"input": ["q"] * 50, "output": ["a"] * 50}), table)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    from lookahead_ray.data.readers import RowReader

    with pytest.raises(RowError) as info, open(truncated, "rb") as f:
        list(RowReader(1 << 20).rows(f, str(truncated), "parquet"))
    assert str(info.value).startswith(f"{truncated}: unreadable_file: not a readable Parquet file")


def _wait_for_complete_checkpoint(run_dir: Path, newer_than: int, process: subprocess.Popen) -> int:
    from lookahead_ray.train.checkpoints import newest_complete

    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        newest = newest_complete(str(run_dir)) if run_dir.is_dir() else None
        if newest is not None and newest.step > newer_than:
            return newest.step
        time.sleep(0.05)
    raise AssertionError(f"no complete checkpoint after step {newer_than} (exit {process.poll()})")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_and_a_kill_right_after_a_checkpoint_resume_from_the_newest_complete_one(ray_local, tmp_path):
    from test_training import _expected_data_sha, _write_rows

    from lookahead_ray.train.checkpoints import newest_complete

    data = _write_rows(tmp_path / "train.jsonl")
    run_dir = tmp_path / "run" / "stopped"
    args = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), f"data.inputs=[{data}]",
            f"train.output_dir={tmp_path / 'run'}", "train.run_name=stopped", "train.max_steps=28",
            "train.checkpoint_every_steps=4", "train.keep_checkpoints=3", "train.warmup_steps=2"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}

    def start() -> subprocess.Popen:  # its own process group, as a shell runs a command
        return subprocess.Popen([sys.executable, "-m", "lookahead_ray", *args], cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

    first = start()
    stepped = _wait_for_complete_checkpoint(run_dir, 0, first)
    os.killpg(first.pid, signal.SIGINT)
    out, err = first.communicate(timeout=120)
    lines = [line for line in console_lines(subprocess.CompletedProcess(args, first.returncode, out, err))
             if "\r" not in line]  # the progress bar
    assert first.returncode == 130, err
    resume_from = newest_complete(str(run_dir))
    assert resume_from.step >= stepped
    assert len(lines) == 2 and lines[0] == ("lookahead-ray: interrupted: stopping the workers (Ctrl-C again to exit "
                                            "at once)"), lines
    assert lines[-1].startswith("lookahead-ray train: interrupted at step "), lines
    assert lines[-1].endswith(f"; rerun the same command to resume from step {resume_from.step} "
                              f"({resume_from.location})"), lines
    assert "Traceback" not in err

    second = start()  # the same command: resumes, then is killed right after its next complete checkpoint
    killed_after = _wait_for_complete_checkpoint(run_dir, resume_from.step, second)
    os.killpg(second.pid, signal.SIGKILL)
    second.wait(timeout=60)
    newest = newest_complete(str(run_dir))
    assert newest.step >= killed_after

    third = start()
    out, err = third.communicate(timeout=400)
    assert third.returncode == 0, err
    result = json.loads((tmp_path / "run" / "train_result.json").read_text())
    assert result["step"] == 28 and result["resumed_from_step"] == newest.step  # not one complete step lost
    assert result["data_sha"] == _expected_data_sha(tmp_path / "run" / "prepared_stopped", steps=28, world_size=2,
                                                    micro_batch_size=4, seed=0)
    assert not [p for p in run_dir.iterdir() if p.name.startswith("checkpoint_") and p.is_dir()
                and not list(p.glob("complete-rank*.json"))]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_on_a_full_disk_is_one_line_keeps_every_complete_checkpoint_and_resumes_once_there_is_space(tmp_path):
    import shlex
    import shutil

    from test_training import _expected_data_sha, _write_rows

    from lookahead_ray.train.checkpoints import survey

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a tmpfs (CI runs as root)")
    data = _write_rows(tmp_path / "train.jsonl")
    out, kept = tmp_path / "out", tmp_path / "kept"
    out.mkdir(), kept.mkdir()
    command = shlex.join([sys.executable, "-m", "lookahead_ray", "train", "--config",
                          str(REPO / "configs" / "tiny_cpu.yaml"), f"data.inputs=[{data}]", f"train.output_dir={out}",
                          "train.run_name=full", "train.max_steps=12", "train.checkpoint_every_steps=4",
                          "train.warmup_steps=2"])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}

    def run_with_space(size: str) -> subprocess.CompletedProcess:
        """The command with its output on a tmpfs of ``size`` (its own Ray: a node of the tests' cluster could
        not see this mount), holding what the last run left; what it leaves is copied back out."""
        script = (f"mount -t tmpfs -o size={size} tmpfs {out} && cp -a {kept}/. {out}/ && {command}; rc=$?; "
                  f"rm -rf {kept} && cp -a {out} {kept}; exit $rc")
        return subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=400)

    full = run_with_space("5m")  # the prepared data, the log and a checkpoint or two (~2 MB each) fit; not all
    lines = [line for line in console_lines(full) if "\r" not in line]
    assert full.returncode == 2, full.stderr
    assert lines[-1].startswith(f"lookahead-ray train: error: no space left on the device: {out}/"), lines
    assert lines[-1].endswith("; free space there (or write elsewhere) and rerun"), lines
    assert len(lines) <= 2 and "Logging error" not in full.stderr, lines  # at most: the log could not be written
    complete, incomplete = survey(str(kept / "full"))
    steps = [c.step for c in complete]
    assert steps and steps == list(range(4, 4 * len(steps) + 1, 4)) and steps[-1] < 12 and len(incomplete) <= 1, steps
    assert all((Path(c.location) / "lookahead_config.yaml").stat().st_size > 0 for c in complete)

    freed = run_with_space("40m")
    assert freed.returncode == 0, freed.stderr
    result = json.loads((kept / "train_result.json").read_text())
    assert result["resumed_from_step"] == steps[-1] and result["step"] == 12
    assert result["data_sha"] == _expected_data_sha(kept / "prepared_full", steps=12, world_size=2,
                                                    micro_batch_size=4, seed=0)
    assert survey(str(kept / "full"))[1] == []  # the incomplete checkpoint was removed


def _prepared(cfg_dict: dict, records: list[dict]) -> list[dict]:
    import pyarrow as pa

    from lookahead_ray.data.transform import PrepareRecords

    table = pa.table({"record": [json.dumps(r) for r in records], "read_error": pa.array([None] * len(records),
                                                                                          pa.string()),
                      "source_file": ["rows.jsonl"] * len(records), "source_row": list(range(1, len(records) + 1))})
    return PrepareRecords(cfg_dict)(table).to_pylist()


def test_sharegpt_records_train_exactly_as_the_same_chat_and_preview_agrees_with_prepare_on_bad_rows(tmp_path):
    from lookahead_ray.config import load_config
    from lookahead_ray.data.preview_file import run_preview_file
    from lookahead_ray.errors import RowError

    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    chats = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {i}+{i}?"},
                           {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(4)]
    sharegpt = [{"id": i, "conversations": [{"from": speakers[t["role"]], "value": t["content"]} for t in c["messages"]]}
                for i, c in enumerate(chats)]
    config = REPO / "configs" / "tiny_cpu.yaml"
    as_chat = _prepared(load_config(config, ["records.format=chat"]).to_dict(), chats)
    as_sharegpt = _prepared(load_config(config, ["records.format=sharegpt"]).to_dict(), sharegpt)
    assert [r["reject_reason"] for r in as_sharegpt] == [None] * 4
    assert [r["input_ids"] for r in as_sharegpt] == [r["input_ids"] for r in as_chat]
    assert [r["labels"] for r in as_sharegpt] == [r["labels"] for r in as_chat]

    source = tmp_path / "sharegpt.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in sharegpt))
    out = tmp_path / "previewed.jsonl"
    run_preview_file(load_config(config, ["records.format=sharegpt"]), str(source), str(out), "jsonl", "jsonl")
    previewed = [json.loads(line) for line in out.read_text().splitlines()]
    assert previewed[0]["id"] == 0 and previewed[0]["conversations"][1]["value"].startswith(
        "What is 0+0? The answer begins with: It is")  # the preview goes onto the last human turn, keys kept

    bad = [sharegpt[0] | {"conversations": sharegpt[0]["conversations"][:2] + [{"from": "gpt", "value": "  "}]},
           sharegpt[1] | {"conversations": [{"from": "bot", "value": "x"}]}]
    rejected = _prepared(load_config(config, ["records.format=sharegpt", "data.on_error=skip"]).to_dict(), bad)
    assert [(r["reject_reason"], r["reject_field"]) for r in rejected] == [
        ("empty_answer", "conversations[2].value"), ("malformed_messages", "conversations[0].from")]
    for i, record in enumerate(bad):  # preview refuses the very rows prepare rejects, naming the same field
        (tmp_path / "bad.jsonl").write_text(json.dumps(record) + "\n")
        with pytest.raises(RowError, match=rf"row 1, field '{re.escape(rejected[i]['reject_field'])}': "
                                           rf"{rejected[i]['reject_reason']}"):
            run_preview_file(load_config(config, ["records.format=sharegpt"]), str(tmp_path / "bad.jsonl"),
                             str(tmp_path / "bad_out.jsonl"), "jsonl", "jsonl")
    flat = _prepared(load_config(config, ["data.on_error=skip"]).to_dict(), sharegpt[:1])
    assert flat[0]["reject_detail"] == ("record has no field 'input' but a sharegpt turn list; set records.format: "
                                        "sharegpt")
