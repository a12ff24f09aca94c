"""Preview throughput: the reference algorithm vs lookahead-ray, measured in one run on the same data.

Run by hand (not a test):

    python benchmarks/preview_throughput.py                       # GSM8K train x20 and x200, real mode, m=6
    python benchmarks/preview_throughput.py --scales 20 --skip-tokenize

Data: ../shared/data/gsm8k/train.jsonl repeated N times into a temporary JSONL file. Tokenizer: Mistral-7B's
SentencePiece model from the mistral_common package, loaded with AutoTokenizer as the reference does; the
Llama-2 chat template with a system prompt for full `prepare`. Each variant runs in its own process; peak RSS
and PSS are that process tree's (Ray workers included), sampled.

Variants:
  reference          the reference algorithm: read every row into a list, tokenizer.tokenize(full answer)
                     per row, convert_tokens_to_string, json.dumps per line (zjunlp/LookAheadTuning main.py)
  transform          AnswerPreviewer over the same rows in one process (no file I/O timed)
  preview-w1/-w2     the drop-in `lookahead-ray preview` command (file to file), 1 and 2 worker processes
  ray-preview-a1/a2  `prepare` with data.tokenize=false through Ray Data, 1 and 2 transform actors
  ray-prepare-a1/a2  `prepare` with chat template + tokenisation + loss masks, 1 and 2 actors
  encode-only        only the Rust tokenizer encoding full prepare cannot avoid (prompt and answer, one core):
                     its rows/s x cores bounds full prepare from above

Timed: from the tokenizer load to the output written (Python imports excluded). Loading a SentencePiece
model converts it to a fast tokenizer (seconds): the reference pays that on every run; lookahead-ray converts
once per machine and loads the cached conversion afterwards (a fresh cache per benchmark run, so the first
lookahead-ray variant pays it). Rows/s are printed with and without the load. Ray variants include ray.init
and actor start-up; their "load" column is 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def _tokenizer_dir(work: Path) -> Path:
    import mistral_common

    target = work / "mistral-tokenizer"
    target.mkdir(exist_ok=True)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", target / "tokenizer.model")
    return target


def _make_input(work: Path, scale: int, rows: int | None = None) -> tuple[Path, int]:
    path = work / f"gsm8k_x{scale}.jsonl"
    lines = GSM8K.read_bytes().rstrip(b"\n").split(b"\n")[:rows]
    with open(path, "wb") as f:
        for _ in range(scale):
            f.write(b"\n".join(lines) + b"\n")
    return path, len(lines) * scale


class TreeRssSampler:
    """Peak summed RSS and PSS of this process and all its descendants (Ray's raylet and workers included).

    RSS counts a shared page once per process that touched it, so Ray's shared-memory object store is counted
    again by every worker that reads a block; PSS splits shared pages between their processes and counts the
    object store once. Their ratio tells object-store fill from real growth."""

    def __init__(self, interval: float = 0.25):
        import psutil

        self.proc, self.interval, self.peak, self._stop = psutil.Process(), interval, 0, threading.Event()
        self.peak_pss = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            rss = pss = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
                except psutil.Error:
                    pass
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_variant(variant: str, src: Path, tok: Path, out: Path) -> dict:
    """Runs in a child process; returns seconds (timed part) and peak RSS."""
    with TreeRssSampler() as rss:
        import transformers  # noqa: F401  (imports are not timed; the tokenizer load is, separately)

        load_seconds = 0.0
        if variant == "reference":
            from transformers import AutoTokenizer

            start = time.perf_counter()
            tokenizer = AutoTokenizer.from_pretrained(str(tok))
            load_seconds = time.perf_counter() - start
            with open(src, encoding="utf-8") as f:
                data = [json.loads(line) for line in f if line.strip()]
            for item in data:
                tokens = tokenizer.tokenize(item["answer"])[:6]
                item["question"] = item["question"] + " The answer begins with: " + \
                    tokenizer.convert_tokens_to_string(tokens)
            with open(out, "w", encoding="utf-8") as f:
                for item in data:
                    f.write(json.dumps(item) + "\n")
            seconds = time.perf_counter() - start
        elif variant == "transform":
            from transformers import AutoTokenizer

            from lookahead_ray.data.preview import AnswerPreviewer

            answers = [json.loads(line)["answer"] for line in open(src, encoding="utf-8")]
            start = time.perf_counter()
            previewer = AnswerPreviewer(AutoTokenizer.from_pretrained(str(tok)), 6)
            load_seconds = time.perf_counter() - start
            for i in range(0, len(answers), 4096):
                previewer.preview_many(answers[i:i + 4096])
            seconds = time.perf_counter() - start
        elif variant == "encode-only":
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core: the floor of full prepare's CPU per row
            from lookahead_ray.modeling import load_tokenizer
            from lookahead_ray.prompts import LLAMA2_CHAT_TEMPLATE, PromptRenderer, user_prompt_messages

            tokenizer = load_tokenizer(str(tok), chat_template=LLAMA2_CHAT_TEMPLATE)
            rows = [json.loads(line) for line in open(src, encoding="utf-8")]
            prompts = PromptRenderer(tokenizer).render_many(
                [user_prompt_messages(r["question"] + " The answer begins with: x", "You are a helpful assistant.")
                 for r in rows])
            answers = [r["answer"] for r in rows]
            encode = tokenizer.backend_tokenizer.encode_batch_fast
            start = time.perf_counter()
            for i in range(0, len(rows), 4096):
                encode(prompts[i:i + 4096], add_special_tokens=False)
                encode(answers[i:i + 4096], add_special_tokens=False)
            seconds = time.perf_counter() - start
        elif variant.startswith("preview-w"):
            from lookahead_ray.config import load_config
            from lookahead_ray.data.preview_file import run_preview_file

            cfg = load_config(None, ["preview.mode=real", f"model.tokenizer={tok}", "records.instruction_field=question",
                                     "records.answer_field=answer"])
            from lookahead_ray.modeling import tokenizer_for

            start = time.perf_counter()
            tokenizer = tokenizer_for(cfg.model)
            load_seconds = time.perf_counter() - start
            run_preview_file(cfg, str(src), str(out), "jsonl", "jsonl", workers=int(variant[-1]), tokenizer=tokenizer)
            seconds = time.perf_counter() - start
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            import ray
            from ray.data import DataContext

            from lookahead_ray.config import load_config
            from lookahead_ray.data.pipeline import run_prepare
            from lookahead_ray.runtime import init_ray

            init_ray(num_cpus=2, log_to_driver=False)  # or joins RAY_ADDRESS
            DataContext.get_current().enable_progress_bars = False
            from lookahead_ray.config import apply_overrides
            from lookahead_ray.prompts import LLAMA2_CHAT_TEMPLATE

            cfg = load_config(None, [
                "preview.mode=real", f"model.tokenizer={tok}", "records.instruction_field=question",
                "records.answer_field=answer", f"data.inputs=[{src}]", f"data.output_dir={out}",
                f"data.num_actors={variant[-1]}", f"data.tokenize={'false' if 'preview' in variant else 'true'}",
                "data.batch_size=4096", "tokenization.system_prompt='You are a helpful assistant.'"])
            cfg = apply_overrides(cfg, {"model.chat_template": LLAMA2_CHAT_TEMPLATE})
            start = time.perf_counter()
            report = run_prepare(cfg)
            seconds = time.perf_counter() - start
            assert report.rows_rejected == 0, report.summary()
            ray.shutdown()
    return {"seconds": seconds, "load_seconds": load_seconds, "peak_rss_mb": rss.peak / 2**20,
            "peak_pss_mb": rss.peak_pss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="20,200", help="GSM8K train repetitions, comma separated")
    parser.add_argument("--skip-tokenize", action="store_true", help="leave out ray-prepare (full tokenisation)")
    parser.add_argument("--skip", default="", help="variants to leave out, comma separated (e.g. transform)")
    parser.add_argument("--smoke", action="store_true", help="the smallest sizes (seconds): a check that it runs")
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "SRC", "TOK", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, src, tok, out = args.child
        print(json.dumps(run_variant(variant, Path(src), Path(tok), Path(out))))
        return
    if args.smoke:  # 1x GSM8K train cut to 200 rows, two variants
        args.scales, args.skip_tokenize = "1", True
        args.skip = "preview-w1,preview-w2,ray-preview-a1,ray-preview-a2"
    if not GSM8K.exists():
        sys.exit(f"skipped: {GSM8K} is absent (the benchmark reads ../shared/data)")
    work = Path(tempfile.mkdtemp(prefix="preview-bench-"))
    os.environ["LOOKAHEAD_RAY_CACHE"] = str(work / "cache")  # children inherit it
    tok = _tokenizer_dir(work)
    variants = ["reference", "transform", "preview-w1", "preview-w2", "ray-preview-a1", "ray-preview-a2"]
    if not args.skip_tokenize:
        variants += ["ray-prepare-a1", "ray-prepare-a2", "encode-only"]
    results: dict[tuple[str, int], dict] = {}
    try:
        for scale in (int(s) for s in args.scales.split(",")):
            src, rows = _make_input(work, scale, 200 if args.smoke else None)
            for variant in variants:
                if variant in args.skip.split(","):
                    continue
                out = work / f"out-{variant}-{scale}"
                proc = subprocess.run([sys.executable, __file__, "--child", variant, str(src), str(tok), str(out)],
                                      capture_output=True, text=True, cwd=REPO)
                if proc.returncode != 0:
                    sys.exit(f"{variant} x{scale} failed:\n{proc.stderr[-3000:]}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                result["rows_per_s"] = rows / result["seconds"]
                result["steady_rows_per_s"] = rows / (result["seconds"] - result["load_seconds"])
                results[(variant, scale)] = result
                print(f"x{scale:<4} {rows:>9,} rows  {variant:<15} {result['seconds']:7.1f} s "
                      f"(tokenizer load {result['load_seconds']:4.1f} s) {result['rows_per_s']:>8,.0f} rows/s, "
                      f"{result['steady_rows_per_s']:>8,.0f} without the load  peak RSS {result['peak_rss_mb']:6.0f} MB "
                      f"PSS {result['peak_pss_mb']:6.0f} MB",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
            src.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nratios (rows/s against the reference in the same run; RSS against the smallest scale):")
    scales = sorted({s for _, s in results})
    for (variant, scale), r in results.items():
        ref = results.get(("reference", scale))
        line = f"x{scale:<4} {variant:<15} "
        if ref:
            line += (f"speed {r['rows_per_s'] / ref['rows_per_s']:5.1f}x reference end to end, "
                     f"{r['steady_rows_per_s'] / ref['steady_rows_per_s']:5.1f}x without the tokenizer load")
        if scale != scales[0] and (variant, scales[0]) in results:
            base = results[(variant, scales[0])]["peak_rss_mb"]
            base_pss = results[(variant, scales[0])]["peak_pss_mb"]
            line += (f"   peak RSS x{scale}/x{scales[0]} = {r['peak_rss_mb'] / base:.2f}, "
                     f"PSS {r['peak_pss_mb'] / base_pss:.2f}")
        print(line)


if __name__ == "__main__":
    main()
