"""Add what the server's processes spent during a `bench serve` replay to its record (run.sh calls this), and print
one line of it.

Usage: python add_process_cpu.py RECORD.json SERVER.log THREADS_BEFORE THREADS_AFTER API_PID CORE_PID
       API_BEFORE API_AFTER CORE_BEFORE CORE_AFTER CLIENT   (four "user,system" CPU seconds, then the bench
       client's "user system")
"""

from __future__ import annotations

import json
import re
import sys

_GC_REPORT = re.compile(r"\[gc\] pid (\d+): generation 0: \d+ collections ([\d.]+) s CPU, generation 1: \d+ "
                        r"collections ([\d.]+) s CPU, generation 2: \d+ collections ([\d.]+) s CPU")


def gc_seconds_during_replay(log_path: str, pid: int) -> float:
    """CPU seconds of garbage collection between the first two reports of ``pid`` (asked for before and after)."""
    totals = [sum(map(float, match[1:])) for match in _GC_REPORT.findall(open(log_path).read())
              if int(match[0]) == pid]
    return round(totals[1] - totals[0], 3)


def thread_seconds(before_path: str, after_path: str) -> dict[str, float]:
    """CPU seconds of each thread that did anything (named by tid and name)."""
    before = {line.split()[0]: line.split() for line in open(before_path)}
    seconds = {}
    for line in open(after_path):
        tid, name, ticks, _ = line.split()
        spent = (int(ticks) - int(before[tid][2])) / 100 if tid in before else int(ticks) / 100
        if spent >= 0.05:
            seconds[f"{tid} {name}"] = spent
    return dict(sorted(seconds.items(), key=lambda item: -item[1]))


def main() -> None:
    record_path, log_path, threads_before, threads_after, api_pid, core_pid = sys.argv[1:7]
    (api_user0, api_sys0), (api_user1, api_sys1), (core_user0, core_sys0), (core_user1, core_sys1) = (
        map(float, arg.split(",")) for arg in sys.argv[7:11])
    record = json.load(open(record_path))
    metrics = record["metrics"]
    cpu = {"api_server_user_s": round(api_user1 - api_user0, 2), "api_server_system_s": round(api_sys1 - api_sys0, 2)}
    cpu["api_server_cpu_s"] = round(cpu["api_server_user_s"] + cpu["api_server_system_s"], 2)
    cpu["api_server_cpu_ms_per_request"] = round(1000 * cpu["api_server_cpu_s"] / metrics["completed"], 3)
    cpu["api_server_cpu_us_per_output_token"] = round(1e6 * cpu["api_server_cpu_s"] / metrics["total_output_tokens"], 1)
    cpu["api_server_threads_s"] = thread_seconds(threads_before, threads_after)
    cpu["api_server_gc_s"] = gc_seconds_during_replay(log_path, int(api_pid))
    cpu["engine_core_cpu_s"] = round(core_user1 + core_sys1 - core_user0 - core_sys0, 2)
    cpu["engine_core_gc_s"] = gc_seconds_during_replay(log_path, int(core_pid))
    cpu["client_cpu_s"] = round(sum(map(float, sys.argv[11].split())), 2)
    record["process_cpu"] = cpu
    json.dump(record, open(record_path, "w"), indent=1)
    print(record_path.rsplit("/", 1)[-1], f"output {record['output_tokens_per_s']:.0f} tok/s, "
          f"TTFT mean {metrics['ttft_ms']['mean']:.0f} ms, {metrics['duration_s']:.1f} s;",
          {k: v for k, v in cpu.items() if k != "api_server_threads_s"}, list(cpu["api_server_threads_s"].values()))


if __name__ == "__main__":
    main()
