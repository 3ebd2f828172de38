"""Per reward-model kind: throughput and latency of the scorer contract (``monitor/reward/kinds``).

Called by ``bench/rm_score.py`` (a section per kind) and runnable alone:

    python bench/rm_score_kinds.py [--texts N]

* ``hf``: a BertForSequenceClassification (num_labels=1) on the bundled MiniLM weights, saved and
  loaded as a checkpoint directory (weights do not change the cost), max_length 256, CPU fp32 or
  CUDA bf16.
* ``judge`` and ``http``: against the STAND-IN servers of the tests (local HTTP in threads, no
  model behind them): these numbers measure the client's own cost (request building, JSON,
  retries machinery, concurrency), not a real judge's latency, and are labelled ``standin``.

Latency: median and 95th percentile wall time of one item scored alone; throughput: texts/s over
the whole list.

A second section gives the stand-in servers a simulated latency (``--server-ms``, 50 ms by default:
each request sleeps that long on the server) and scores with ``resilience.concurrency`` 1, 4 and
16, the judge one item per request and the JSON endpoint unbatched and batched: what the
concurrency limit buys against a slow endpoint (ideal: concurrency / latency requests per second).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "reward" / "kinds"))


def _measure(backend: Any, items: list[Any], single: int = 20) -> dict[str, float]:
    backend.score(items[:8])  # warm-up
    t0 = time.perf_counter()
    scores = backend.score(items)
    total = time.perf_counter() - t0
    lat = []
    for it in items[:single]:
        t1 = time.perf_counter()
        backend.score([it])
        lat.append(time.perf_counter() - t1)
    return {
        "texts_per_s": round(len(items) / total, 1),
        "latency_ms_p50": round(1000 * statistics.median(lat), 2),
        "latency_ms_p95": round(1000 * statistics.quantiles(lat, n=20, method="inclusive")[-1], 2),
        "failed": sum(1 for s in scores if not s.ok),
    }


def _hf(items: list[Any], tmp: Path) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry
    from transformers import AutoTokenizer, BertForSequenceClassification

    from monitor.reward.kinds.config import HfConfig
    from monitor.reward.kinds.hf import HfBackend
    from monitor.reward.kinds.resilience import BackendMetrics
    from monitor.reward.model import packaged_encoder_dir

    src = packaged_encoder_dir()
    BertForSequenceClassification.from_pretrained(src, num_labels=1, local_files_only=True).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src, local_files_only=True).save_pretrained(tmp)  # type: ignore[no-untyped-call, unused-ignore]
    b = HfBackend(
        HfConfig(path=str(tmp), max_length=256, batch_size=32), "hf-bench", BackendMetrics.on(CollectorRegistry())
    )
    return {"kind": "hf", "device": b.device, "dtype": str(b.dtype).removeprefix("torch."), **_measure(b, items)}


def _remote(items: list[Any]) -> list[dict[str, Any]]:
    from prometheus_client import CollectorRegistry
    from standin import chat_answer, json_answer, serve

    from monitor.reward.kinds.config import HttpJsonConfig, JudgeConfig
    from monitor.reward.kinds.http_json import HttpJsonBackend
    from monitor.reward.kinds.judge import JudgeBackend
    from monitor.reward.kinds.resilience import BackendMetrics

    out = []
    m = BackendMetrics.on(CollectorRegistry())
    for server in serve(chat_answer):
        j = JudgeBackend(JudgeConfig(base_url=f"{server.url}/v1", model="standin"), "judge-bench", m)
        out.append({"kind": "judge", "target": "standin", "concurrency": 4, **_measure(j, items)})
        j.close()
    for server in serve(json_answer):
        h = HttpJsonBackend(HttpJsonConfig(url=f"{server.url}/score", score_path="outputs.0.data"), "http-bench", m)
        out.append({"kind": "http", "target": "standin", "batch": 32, **_measure(h, items)})
        h.close()
    return out


def slow_section(items: list[Any], server_ms: float) -> list[dict[str, Any]]:
    """judge and http against stand-ins that take ``server_ms`` per request, per concurrency limit."""
    from prometheus_client import CollectorRegistry
    from standin import chat_answer, json_answer, serve

    from monitor.reward.kinds.config import HttpJsonConfig, JudgeConfig, ResilienceConfig
    from monitor.reward.kinds.http_json import HttpJsonBackend
    from monitor.reward.kinds.judge import JudgeBackend
    from monitor.reward.kinds.resilience import BackendMetrics

    out: list[dict[str, Any]] = []
    m = BackendMetrics.on(CollectorRegistry())
    items = items[:64]
    for conc in (1, 4, 16):
        res = ResilienceConfig(concurrency=conc, timeout_s=5.0)
        for server in serve(chat_answer):
            server.script.mode, server.script.delay = "slow", server_ms / 1000
            j = JudgeBackend(JudgeConfig(base_url=f"{server.url}/v1", model="standin", resilience=res), "j", m)
            out.append({"kind": "judge", "server_ms": server_ms, "concurrency": conc, **_measure(j, items, 10)})
            j.close()
        for batched in (False, True):
            for server in serve(json_answer):
                server.script.mode, server.script.delay = "slow", server_ms / 1000
                cfg = HttpJsonConfig(
                    url=f"{server.url}/score", score_path="outputs.0.data", batched=batched, max_batch=8, resilience=res
                )
                h = HttpJsonBackend(cfg, "h", m)
                row = {"kind": "http", "batch": 8 if batched else 1, "server_ms": server_ms, "concurrency": conc}
                out.append({**row, **_measure(h, items, 10)})
                h.close()
    return out


def kinds_section(prompts: list[str], responses: list[str], server_ms: float = 50.0) -> list[dict[str, Any]]:
    from monitor.reward.kinds import Item

    items = [Item(p, r) for p, r in zip(prompts, responses, strict=True)]
    with tempfile.TemporaryDirectory() as tmp:
        results = [_hf(items, Path(tmp)), *_remote(items)]
    for r in results:
        label = f"{r['kind']}" + (" (stand-in server, no model)" if r.get("target") == "standin" else "")
        print(
            f"  {label}: {r['texts_per_s']} texts/s, one item {r['latency_ms_p50']} ms p50 / "
            f"{r['latency_ms_p95']} ms p95, failed {r['failed']}"
        )
    if server_ms > 0:
        print(f"  stand-in servers with {server_ms:.0f} ms simulated latency per request:")
        slow = slow_section(items, server_ms)
        for r in slow:
            what = r["kind"] + (f" batch {r['batch']}" if "batch" in r else "")
            print(
                f"    {what}, concurrency {r['concurrency']}: {r['texts_per_s']} texts/s, one item "
                f"{r['latency_ms_p50']} ms p50 / {r['latency_ms_p95']} ms p95, failed {r['failed']}"
            )
        results += [{**r, "target": "standin-slow"} for r in slow]
    return results


def main() -> int:
    import argparse

    from bench.shared_data import shared_data
    from monitor.reward.data import load_alpaca_eval

    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--server-ms", type=float, default=50.0, help="simulated stand-in latency (0: skip that section)")
    args = ap.parse_args()
    rows = [r for rs in load_alpaca_eval(shared_data("alpaca_eval")).values() for r in rs][: args.texts]
    out = kinds_section([r["instruction"] for r in rows], [r["output"] for r in rows], args.server_ms)
    print(json.dumps({"bench": "rm_score_kinds", "texts": len(rows), "kinds": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
