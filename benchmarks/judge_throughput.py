"""HTTP judge throughput: IF judgements per second at client concurrency 1 / 4 / 16 against a local server.

    python benchmarks/judge_throughput.py --judgements 64 --delay 0.05

The server (tests/judge_fakes.py's FakeChatServer on 127.0.0.1) answers every chat-completions request after a
fixed delay, standing in for a vLLM server. One judgement is one IF vote on a colour edit: one request carrying two
PNG images (64x64 by default, so that this machine's CPUs, which also run the server, are not what is measured; use
``--size 512`` to see the client's image-encoding cost). With an unlimited server, throughput should grow with the
client's `max_concurrency`; with ``--server-slots K`` the server works on at most K requests at once, so throughput
stops growing past K. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from editr2.bench.judges import IFConfig, IFJudge, OpenAIChatConfig, OpenAIChatVLM, RetryPolicy, TurnRequest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from judge_fakes import FakeChatServer  # noqa: E402 - the test suite's fake server


def requests(count: int, size: int) -> list[TurnRequest]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(count):
        before = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        after = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        items.append(TurnRequest(turn=0, instruction=f"make cup {i} red", task_type="color_alter",
                                 formatted_instruction=f"Change the color of [cup {i}] to [red]", source_image=before,
                                 input_image=before, output_image=after, history_images=(before,)))
    return items


def measure(batch: list[TurnRequest], concurrency: int, delay: float, server_slots: int | None, repeats: int) -> dict:
    """Best of `repeats` runs (this machine's CPUs are shared, so the best run is the least disturbed one)."""
    return max((measure_once(batch, concurrency, delay, server_slots) for _ in range(repeats)),
               key=lambda row: row["rate"])


def measure_once(batch: list[TurnRequest], concurrency: int, delay: float, server_slots: int | None) -> dict:
    with FakeChatServer(delay_s=delay, server_slots=server_slots) as server:
        vlm = OpenAIChatVLM(OpenAIChatConfig(model="bench", base_url=server.base_url, max_concurrency=concurrency,
                                             timeout_s=30))
        judge = IFJudge(vlm, None, IFConfig(num_votes=1), RetryPolicy(1))
        start = time.perf_counter()
        results = judge.judge_many(batch)
        seconds = time.perf_counter() - start
        missing = sum(r.is_missing for r in results)
        return {"seconds": seconds, "rate": len(batch) / seconds, "in_flight": server.max_in_flight,
                "missing": missing}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judgements", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the best is reported")
    parser.add_argument("--delay", type=float, default=0.05, help="server delay per request, seconds")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--server-slots", type=int, nargs="+", default=[0, 8],
                        help="server-side parallel limits to try (0 = unlimited)")
    args = parser.parse_args(argv)

    batch = requests(args.judgements, args.size)
    print(f"judgements={args.judgements} server delay={args.delay * 1000:.0f} ms images=2x{args.size}px PNG\n")
    print("| server slots | client concurrency | seconds | judgements/s | ideal/s | speed-up vs 1 | max in flight "
          "| missing |")
    print("|---|---|---|---|---|---|---|---|")
    for slots in args.server_slots:
        base = None
        for concurrency in args.concurrency:
            row = measure(batch, concurrency, args.delay, slots or None, args.repeats)
            base = base or row["rate"]
            ideal = min(concurrency, slots or concurrency) / args.delay
            print(f"| {slots or 'unlimited'} | {concurrency} | {row['seconds']:.2f} | {row['rate']:.1f} | "
                  f"{ideal:.0f} | {row['rate'] / base:.1f}x | {row['in_flight']} | {row['missing']} |")


if __name__ == "__main__":
    main()
