#!/usr/bin/env python3
"""Inclusive attribution of a `perf record --call-graph dwarf` profile of the worker to its parts.

Usage: python3 crates/blinger-worker/benches/tools/perf_attribution.py target/loadbench/perf/perf-quorum-c512-0ms.data
(profiles come from `LOADBENCH_PERF=target/loadbench/perf cargo bench --bench load -- ...`).
A sample counts for every category whose pattern matches a frame of its stack, so categories
overlap; "malloc (self)" counts samples whose leaf frame is the allocator."""
import sys, re, subprocess, collections
data = sys.argv[1]
cats = [  # (label, regex on any frame) — inclusive
 ("pipeline: Pipeline::process (all per-job work on runtime threads)", r"Pipeline::process"),
 ("  Blinger call in the job's task (reqwest + answer parsing)", r"(?s)(?=.*Pipeline::process)(?=.*(reqwest::|Client::request|read_accepted|blinger::model))"),
 ("  store record (sled inserts + group-commit wait)", r"sled::tree::Tree::insert|Store::record|flush_generation|record_and_ack::\{async_fn#0\}::\{closure_env"),
 ("  store.get (lookup)", r"store::Store::get"),
 ("  receipt publish (serde+lapin publish+confirm)", r"Pipeline::receipt|receipts::message|SessionOutbox.*publish"),
 ("  ack (lapin basic.ack)", r"Acker::ack|Pipeline::ack"),
 ("  prometheus metrics", r"prometheus::"),
 ("  limiter", r"ratelimit::Limiter"),
 ("dispatch::submit (decode+lane+spawn)", r"Dispatcher::submit"),
 ("  job::decode", r"job::decode"),
 ("hyper connection tasks (HTTP I/O)", r"hyper::proto::h1::dispatch|hyper::client::conn"),
 ("lapin io loop thread", r"lapin::io_loop"),
 ("lapin frame parse/serialise", r"amq_protocol::|lapin::frames|lapin::channel::Channel::handle"),
 ("sled flush (group commit fsync thread)", r"sled::.*flush|Db::flush|Tree::flush|PageCache::flush|Log::flush|iobuf"),
 ("sled (any)", r"sled::"),
 ("tokio scheduler park/unpark", r"Parker|park_internal|park_timeout|Driver::park|unpark"),
 ("malloc/free/realloc (self)", None),
 ("kernel: network syscalls (send/recv/epoll)", r"sys_sendto|sys_recvfrom|sys_write|sys_read|sys_epoll|tcp_|sock_"),
 ("kernel: futex", r"futex"),
 ("kernel: fsync/fdatasync", r"fsync|fdatasync"),
]
out = subprocess.run(["perf","script","-i",data,"-F","comm,tid,ip,sym"],capture_output=True,text=True).stdout
samples = []
cur = None
for line in out.split("\n"):
    if not line.strip(): continue
    if not line[0].isspace():
        cur = [line]; samples.append(cur)
    elif cur is not None: cur.append(line)
samples = ["\n".join(x) for x in samples]
n = 0
counts = collections.Counter()
leaf = collections.Counter()
for s in samples:
    lines = [l.strip() for l in s.strip().split("\n") if l.strip()]
    if not lines: continue
    n += 1
    frames = lines[1:]
    if frames:
        f0 = frames[0].split(None,1)[-1]
        if re.search(r"malloc|free|realloc|unlink_chunk|malloc_consolidate", f0): counts["malloc/free/realloc (self)"] += 1
    stack = "\n".join(frames)
    for label, rx in cats:
        if rx and re.search(rx, stack): counts[label] += 1
print(f"{n} samples")
for label, _ in cats:
    print(f"{100*counts[label]/max(n,1):5.1f}%  {label}")
