"""S3 storage: checkpoint transfer throughput against plain boto3, and the sync time of an unchanged dataset.

Against a local S3-compatible server (moto's server mode, started here on a free port; the machine's cores are
shared between it and this client):

1. Checkpoints: --files files of --size-mb MB each, uploaded and then downloaded by Trainyard's S3Storage
   (sha256 in the metadata, stale-upload cleanup, pointer object, download verified against the sha256 and
   renamed into place) and by plain boto3 upload_file/download_file on the same client and TransferConfig.
   Trainyard runs twice: as checkpoints upload (their sha256 is already in the CheckpointStore manifest, written
   at save time, and is passed in), and as any other file (Trainyard reads it once more to hash it first).
   In each of --repeats rounds every file goes up and down once each way, in rotating order; s3_vs_boto3 is the
   median over rounds of boto3 time / Trainyard checkpoint time (1.0 = as fast; target >= 0.95).
2. Dataset: --dataset-files small objects synced once into a cache, then synced again with nothing changed
   (median of 3): cached_sync_s (target <= 2 s). Each cached sync also prints the CPU seconds the S3 server and
   this process spent on it: against moto, the server's share (building the listing) is most of the time.

    python bench/storage.py [--files 3] [--size-mb 64] [--repeats 7] [--dataset-files 10000]
Last line: s3_vs_boto3=<ratio> cached_sync_s=<s>
It needs no stack: it starts its own S3 server. SIGTERM stops the server, removes the files and exits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import psutil
from _common import exit_on_sigterm

from infra.storage import sha256_file
from infra.storage.s3 import S3Settings, S3Storage

MB = 1024 * 1024
BUCKET = "trainyard-bench"
SERVERS: list[subprocess.Popen] = []  # the moto servers this bench started and has not stopped yet


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stderr=subprocess.DEVNULL)
    SERVERS.append(proc)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


@contextmanager
def fresh_server() -> Iterator[tuple[S3Storage, psutil.Process]]:
    """A new moto server and the bench bucket; yields a storage on it and the server's process (for its CPU time)."""
    proc, url = start_moto()
    try:
        storage = S3Storage(BUCKET, "bench", settings=S3Settings(endpoint_url=url, region="us-east-1"))
        storage.client.create_bucket(Bucket=BUCKET)
        yield storage, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        SERVERS.remove(proc)


def trainyard_file(storage: S3Storage, path: Path, sha256: str | None, out: Path) -> float:
    start = time.perf_counter()
    storage.upload_file(path, f"ty/{path.name}", pointer="ty/latest.json", sha256=sha256)
    storage.download_file(f"ty/{path.name}", out / path.name)
    return time.perf_counter() - start


def boto3_file(storage: S3Storage, path: Path, sha256: str | None, out: Path) -> float:
    client, bucket, key = storage.client, storage.bucket, f"{storage.prefix}/b3/{path.name}"
    start = time.perf_counter()
    client.upload_file(str(path), bucket, key, Config=storage.transfer)
    client.download_file(bucket, key, str(out / path.name), Config=storage.transfer)
    return time.perf_counter() - start


def clear(storage: S3Storage, out: Path) -> None:
    """Empty the checkpoint prefix and the download folder: moto keeps objects in memory."""
    listed = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=f"{storage.prefix}/").get("Contents", [])
    for obj in listed:
        storage.client.delete_object(Bucket=storage.bucket, Key=obj["Key"])
    for path in out.iterdir():
        path.unlink()


def transfers(storage: S3Storage, tmp: Path, count: int, size_mb: int, repeats: int) -> float:
    """Per round, each file goes up and down once per way, the ways in rotating order; returns the median over
    rounds of boto3 time / Trainyard checkpoint time (paired by round: the machine's load drifts between rounds)."""
    files: dict[Path, str] = {}
    for i in range(count):
        path = tmp / f"ckpt-{i}.pt"
        path.write_bytes(os.urandom(size_mb * MB))
        files[path] = sha256_file(path)  # what CheckpointStore records when it saves a checkpoint
    out = tmp / "out"
    out.mkdir()
    ways = {
        "boto3": lambda path: boto3_file(storage, path, None, out),
        "trainyard checkpoint": lambda path: trainyard_file(storage, path, files[path], out),
        "trainyard other file": lambda path: trainyard_file(storage, path, None, out),
    }
    names = list(ways)
    for name in names:  # warm every path: connections, imports
        ways[name](next(iter(files)))
    clear(storage, out)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        spent = dict.fromkeys(names, 0.0)
        for i, path in enumerate(files):
            turn = (r * count + i) % len(names)
            for name in names[turn:] + names[:turn]:
                spent[name] += ways[name](path)
                clear(storage, out)
        for name in names:
            times[name].append(spent[name])
        print(f"round {r + 1}: " + ", ".join(f"{name} {spent[name]:.2f} s" for name in names), flush=True)
    moved = 2 * count * size_mb
    print(f"upload + download of {count} x {size_mb} MB, medians of {repeats} rounds:")
    ratios = {}
    for name, runs in times.items():
        ratios[name] = statistics.median(b / t for b, t in zip(times["boto3"], runs, strict=True))
        median = statistics.median(runs)
        print(f"  {name}: {median:.2f} s, {moved / median:.0f} MB/s, boto3/this x{ratios[name]:.3f}")
    return ratios["trainyard checkpoint"]


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def dataset_sync(storage: S3Storage, server: psutil.Process, tmp: Path, count: int) -> float:
    prefix = f"{storage.prefix}/dataset"
    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:  # 10 classes, ~1 KB images
        list(
            pool.map(
                lambda i: storage.client.put_object(
                    Bucket=storage.bucket, Key=f"{prefix}/train/class{i % 10}/{i:05d}.png", Body=os.urandom(1024)
                ),
                range(count),
            )
        )
    print(f"dataset: {count} objects put in {time.perf_counter() - started:.1f} s", flush=True)
    dataset = S3Storage(storage.bucket, prefix, settings=storage.settings)
    first = dataset.sync_to_cache(tmp / "cache")
    print(f"first sync: {first.downloaded} files, {first.bytes_downloaded / MB:.1f} MB in {first.seconds:.1f} s")
    cached = []
    for _ in range(3):
        server_before, client_before = cpu_seconds(server), time.process_time()
        result = dataset.sync_to_cache(tmp / "cache")
        assert result.downloaded == 0 and result.unchanged == count, result
        cached.append(result.seconds)
        # Where the time goes: the server's CPU (moto builds the listing's XML) and this process's (Trainyard).
        server_cpu, client_cpu = cpu_seconds(server) - server_before, time.process_time() - client_before
        print(f"cached sync: {result.seconds:.2f} s; CPU: S3 server {server_cpu:.2f} s, Trainyard {client_cpu:.2f} s")
    return statistics.median(cached)


def stop(tmp: Path) -> None:
    for proc in SERVERS:
        proc.kill()
        proc.wait(timeout=10)
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=3)
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dataset-files", type=int, default=10_000)
    args = parser.parse_args()

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_EC2_METADATA_DISABLED="true")
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        exit_on_sigterm(lambda: stop(Path(tmp)))
        with fresh_server() as (storage, _):  # each measurement on a fresh server: moto's memory grows with traffic
            ratio = transfers(storage, Path(tmp), args.files, args.size_mb, args.repeats)
        with fresh_server() as (storage, server):
            cached_s = dataset_sync(storage, server, Path(tmp), args.dataset_files)
    print(f"s3_vs_boto3={ratio:.3f} cached_sync_s={cached_s:.2f}")


if __name__ == "__main__":
    main()
