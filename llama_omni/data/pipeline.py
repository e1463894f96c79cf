"""The resumable data build: select items, run the steps, write the manifest and a report.

Layout of a data set directory (`out` in the config):

    items.jsonl, selection.json   the selected instructions and filter counts (written once;
                                  a larger source.limit appends items)
    state/<step>/<shard>.jsonl    per-step results (see state.py: each item done once)
    audio/instruction/<id>.flac   instruction speech (16 kHz FLAC)
    audio/response/<id>.flac      response speech
    manifest.jsonl, report.json   the data set (see manifest.py) and the summary

Rerunning any command continues where the last run stopped. Failed items are final
(their reason is in the report); `retry_failed=True` gives them another try. Items are
dealt to shards round-robin (`--shard i/n`); shards may share one directory (their logs
and temp files are kept apart) and the manifest covers every shard present.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from llama_omni.data.config import STEPS, DataConfig
from llama_omni.data.filters import apply_filters
from llama_omni.data.llm_backends import ChatBackend, make_backend
from llama_omni.data.manifest import (
    MANIFEST_NAME,
    atomic_write_text,
    read_jsonl,
    remove_temp_files,
    write_jsonl,
)
from llama_omni.data.sources import read_source
from llama_omni.data.state import Shard, ShardLock, StepLog, read_step
from llama_omni.data.steps import STEP_CLASSES, Step

ITEMS_NAME, SELECTION_NAME, REPORT_NAME = "items.jsonl", "selection.json", "report.json"


class Pipeline:
    def __init__(self, config: DataConfig, shard: Shard | None = None, workers: int | None = None,
                 retry_failed: bool = False, progress: bool = True, log=print,
                 llm: ChatBackend | None = None):
        """llm: a ready backend for the text steps (default: built from config.llm)."""
        self.config, self.shard, self.root = config, shard or Shard(), Path(config.out)
        self.workers = workers or config.synthesize.workers
        self.retry_failed, self.progress, self.log = retry_failed, progress, log
        self._backend = llm
        self._tag = f"-{self.shard.tag}"  # temp files of this shard's writers (manifest.py)

    # -- selection -------------------------------------------------------------------------

    def _fingerprint(self, limit: int | None) -> str:
        """Identifies the selection: source and filters, with `limit` as the source's limit."""
        source = {**self.config.source.to_dict(), "limit": limit}
        keys = {"source": source, "filters": self.config.filters.to_dict()}
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]

    def select(self) -> list[dict]:
        """The selected items: read once from the source, then always from items.jsonl.

        Raising `source.limit` grows a built data set: the first items stay as they are
        (and keep their finished steps), the next ones that pass the filters are added."""
        items_path, selection_path = self.root / ITEMS_NAME, self.root / SELECTION_NAME
        limit = self.config.source.limit
        if items_path.is_file() and selection_path.is_file():
            saved = json.loads(selection_path.read_text())
            saved_limit = saved["config"]["source"]["limit"]
            if saved["fingerprint"] != self._fingerprint(saved_limit):
                raise ValueError(
                    f"{self.root} was built from another source/filters config "
                    f"({saved['config']}); use a new `out` directory for a different selection")
            items = list(read_jsonl(items_path))
            if limit == saved_limit:
                return items
            if limit is not None and (saved_limit is None or limit < saved_limit):
                raise ValueError(
                    f"{self.root} holds a selection of source.limit={saved_limit}; a smaller "
                    f"limit ({limit}) would drop built items: raise the limit or use a new `out`")
            return self._select_from_source(previous=items)
        return self._select_from_source(previous=[])

    def _select_from_source(self, previous: list[dict]) -> list[dict]:
        rejected: Counter = Counter()
        kept = apply_filters(read_source(self.config.source), self.config.filters, rejected)
        items = [{"id": i.id, "source": i.source, "text": i.text, "response": i.response}
                 for i in islice(kept, self.config.source.limit)]
        if not items:
            raise ValueError(f"no instruction passed the filters (rejected: {dict(rejected)})")
        if [i["id"] for i in items[:len(previous)]] != [i["id"] for i in previous]:
            raise ValueError(f"the source no longer starts with the {len(previous)} items "
                             f"selected in {self.root}; use a new `out` directory")
        if previous:
            self.log(f"selection grows from {len(previous)} to {len(items)} items")
        write_jsonl(self.root / ITEMS_NAME, items, self._tag)
        limit = self.config.source.limit
        summary = {"fingerprint": self._fingerprint(limit), "selected": len(items),
                   "rejected": dict(rejected), "config": {"source": self.config.source.to_dict(),
                                                          "filters": self.config.filters.to_dict()}}
        atomic_write_text(self.root / SELECTION_NAME, json.dumps(summary, indent=2) + "\n", self._tag)
        return items

    # -- running ---------------------------------------------------------------------------

    def run(self, steps: tuple[str, ...] = STEPS) -> dict:
        """Run `steps` in order on this shard, then write the manifest and the report."""
        unknown = [s for s in steps if s not in STEP_CLASSES]
        if unknown:
            raise ValueError(f"unknown step(s) {unknown}; steps are {list(STEP_CLASSES)}")
        self.root.mkdir(parents=True, exist_ok=True)
        with ShardLock(self.root, self.shard):
            removed = remove_temp_files(self.root, self._tag)
            if removed:
                self.log(f"removed {removed} unfinished temp file(s) of an interrupted run")
            items = list(enumerate(self.select()))
            wave = self.config.wave or len(items)
            for start in range(0, len(items), wave):
                for name in steps:
                    self.run_step(name, items[start:start + wave])
                if start + wave < len(items):
                    self.finish()  # a complete, growing data set after every wave
        return self.finish()

    def _step(self, name: str) -> Step:
        return STEP_CLASSES[name](self.config, self.root, self._tag, self._llm)

    def _llm(self) -> ChatBackend:
        if self._backend is None:  # one model for rewrite and respond in the same run
            self._backend = make_backend(self.config.llm, self.config.seed)
        return self._backend

    def pending(self, step: Step, items: list[tuple[int, dict]]) -> list[dict]:
        """Views of this shard's items (with their positions) that `step` still has to do
        and can do."""
        done = read_step(self.root, step.name)
        earlier = {name: read_step(self.root, name) for name in step.requires}
        views = []
        for position, item in items:
            record = done.get(item["id"])
            if not self.shard.owns(position) or record and (record["ok"] or not self.retry_failed):
                continue
            view = dict(item)
            for name, records in earlier.items():
                view[name] = records.get(item["id"])
            if all(view[name] and view[name]["ok"] for name in earlier):
                views.append(view)
        return views

    def run_step(self, name: str, items: list[tuple[int, dict]]) -> None:
        step = self._step(name)
        views = self.pending(step, items)
        if not views:
            self.log(f"{name}: nothing to do")
            return
        problem = step.ready()
        if problem:
            self.log(f"{name}: skipped, {problem}")
            return
        batches = [views[i:i + self.config.batch_size]
                   for i in range(0, len(views), self.config.batch_size)]
        if self.config.executor == "ray":
            results = _run_ray(step, batches, self.workers)
        elif step.parallel and self.workers > 1:
            results = _run_pool(step, batches, self.workers)
        else:
            results = map(step.process, batches)
        with StepLog(self.root, name, self.shard) as log, \
                tqdm(total=len(views), desc=name, unit="item", disable=not self.progress,
                     dynamic_ncols=True) as bar:
            for records in results:
                log.append(records)
                bar.update(len(records))
                bar.set_postfix(failed=sum(not r["ok"] for r in records), refresh=False)

    # -- output ----------------------------------------------------------------------------

    def finish(self) -> dict:
        """Write manifest.jsonl and report.json from everything done so far (all shards)."""
        from llama_omni.data.report import assemble, summarize

        items = list(read_jsonl(self.root / ITEMS_NAME))
        records = {name: read_step(self.root, name) for name in STEPS}
        manifest = list(assemble(items, records))
        write_jsonl(self.root / MANIFEST_NAME, manifest, self._tag)
        selection = json.loads((self.root / SELECTION_NAME).read_text())
        report = summarize(items, records, manifest, selection)
        atomic_write_text(self.root / REPORT_NAME, json.dumps(report, indent=2) + "\n", self._tag)
        return report


# -- executors: each yields one list of records per batch, as batches finish ---------------

_worker_step: Step | None = None


def _init_worker(name: str, config: dict, root: str, tag: str) -> None:
    global _worker_step
    _worker_step = STEP_CLASSES[name](DataConfig.from_dict(config), Path(root), tag)


def _work(batch: list[dict]) -> list[dict]:
    return _worker_step.process(batch)


def _run_pool(step: Step, batches: list[list[dict]], workers: int) -> Iterator[list[dict]]:
    """Worker processes (spawned, so no model or thread state is inherited)."""
    small = [[view] for batch in batches for view in batch]  # per item: even load, fine progress
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, _init_worker, (step.name, step.config.to_dict(), str(step.root),
                                              step.tag)) as pool:
        yield from pool.imap_unordered(_work, small)


class _RayStep:
    def __init__(self, name: str, config: dict, root: str, tag: str):
        self.step = STEP_CLASSES[name](DataConfig.from_dict(config), Path(root), tag)

    def __call__(self, batch: dict) -> dict:
        views = [json.loads(v) for v in batch["view"]]
        return {"record": [json.dumps(r) for r in self.step.process(views)]}


def _run_ray(step: Step, batches: list[list[dict]], workers: int) -> Iterator[list[dict]]:
    """Ray Data: the same step in `workers` actors (on a cluster when `ray start` made one)."""
    try:
        import ray
    except ImportError:
        raise ValueError("executor 'ray' needs Ray Data: `pip install 'ray[data]'`") from None
    rows = [{"view": json.dumps(v)} for batch in batches for v in batch]
    dataset = ray.data.from_items(rows).map_batches(
        _RayStep, fn_constructor_args=(step.name, step.config.to_dict(), str(step.root), step.tag),
        batch_size=len(batches[0]), concurrency=workers if step.parallel else 1)
    for row in dataset.iter_rows():
        yield [json.loads(row["record"])]
