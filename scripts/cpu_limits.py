"""What this CPU can do at most, to put kernel speeds against: the int8 dot-product peak (a loop of independent
`vpdpbusd`, 256- and 512-bit) and the memory read bandwidth, each on 1 and on N threads.

    python scripts/cpu_limits.py [--threads N] [--seconds S] [--json]

The probes are a small C program compiled here with the system compiler (`cc`, OpenMP): TVM's code generator
would add its own overheads to a loop this simple, and the point is the machine's ceiling. A MAC is one
int8 x uint8 product summed into an int32 lane (vpdpbusd does 4 per lane: 64 per 512-bit instruction).
On Zen 4 a 512-bit vpdpbusd runs at half rate (two 256-bit halves), on Zen 5 and Intel's AVX-512 cores at full
rate: the two widths side by side show which one this core is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

static double now(void) { return omp_get_wtime(); }

/* 12 independent accumulators, each its own register (written out: a loop over an array of them is kept in
   memory at -O2): enough to cover vpdpbusd's latency on every core we have. */
#define TWELVE(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7) OP(8) OP(9) OP(10) OP(11)
#define DECL512(i) __m512i a##i = _mm512_set1_epi32((int)iters + i);  /* distinct: not merged */
#define STEP512(i) a##i = _mm512_dpbusd_epi32(a##i, x, w);
#define SUM512(i) s += _mm512_reduce_add_epi32(a##i);
#define DECL256(i) __m256i a##i = _mm256_set1_epi32((int)iters + i);
#define STEP256(i) a##i = _mm256_dpbusd_epi32(a##i, x, w);
#define SUM256(i) _mm256_storeu_si256((__m256i *)out, a##i); for (int j = 0; j < 8; j++) s += out[j];

__attribute__((target("avx512f,avx512vnni")))
static long dp512(long iters) {
  __m512i x = _mm512_set1_epi8((char)iters), w = _mm512_set1_epi8((char)(iters >> 8));
  TWELVE(DECL512)
  for (long n = 0; n < iters; n++) { TWELVE(STEP512) }
  long s = 0;
  TWELVE(SUM512)
  return s;
}

__attribute__((target("avx512f,avx512vl,avx512vnni")))
static long dp256(long iters) {
  __m256i x = _mm256_set1_epi8((char)iters), w = _mm256_set1_epi8((char)(iters >> 8));
  TWELVE(DECL256)
  for (long n = 0; n < iters; n++) { TWELVE(STEP256) }
  int out[8]; long s = 0;
  TWELVE(SUM256)
  return s;
}

/* GMAC/s of `threads` threads running the loop for about `seconds`. */
static double peak(int width, int threads, double seconds) {
  long iters = 1000000;
  double t;
  for (;;) {  /* grow the loop until one run takes a tenth of the time asked for */
    t = now();
    volatile long sink = width == 512 ? dp512(iters) : dp256(iters);
    (void)sink;
    t = now() - t;
    if (t > seconds / 10) break;
    iters *= 2;
  }
  long total = (long)(iters * (seconds / t));
  t = now();
  long sink = 0;
#pragma omp parallel num_threads(threads) reduction(+:sink)
  sink += width == 512 ? dp512(total) : dp256(total);
  t = now() - t;
  if (sink == 42) printf("#");
  return (double)total * threads * 12 * (width / 8) / t / 1e9;
}

/* GB/s of `threads` threads summing a buffer far larger than the caches, each its own contiguous share. */
__attribute__((target("avx2")))
static double bandwidth(int threads, double seconds, size_t bytes) {
  char *buf = aligned_alloc(64, bytes);
  memset(buf, 1, bytes);
  double best = 0;
  double end = now() + seconds;
  while (now() < end) {
    double t = now();
    long sink = 0;
#pragma omp parallel num_threads(threads) reduction(+:sink)
    {
      int id = omp_get_thread_num();
      size_t share = bytes / threads / 128 * 128;
      const __m256i *p = (const __m256i *)(buf + share * id);
      __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
      for (size_t i = 0; i < share / 32; i += 4) {
        a0 = _mm256_add_epi64(a0, _mm256_load_si256(p + i));
        a1 = _mm256_add_epi64(a1, _mm256_load_si256(p + i + 1));
        a2 = _mm256_add_epi64(a2, _mm256_load_si256(p + i + 2));
        a3 = _mm256_add_epi64(a3, _mm256_load_si256(p + i + 3));
      }
      long out[4];
      _mm256_storeu_si256((__m256i *)out, _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
      sink += out[0] + out[1] + out[2] + out[3];
    }
    t = now() - t;
    if (sink == 42) printf("#");
    double rate = (double)(bytes / threads / 128 * 128 * threads) / t / 1e9;
    if (rate > best) best = rate;
  }
  free(buf);
  return best;
}

int main(int argc, char **argv) {
  int threads = atoi(argv[1]);
  double seconds = atof(argv[2]);
  size_t bytes = (size_t)atol(argv[3]);
  int vnni = __builtin_cpu_supports("avx512vnni");
  printf("{\"avx512vnni\": %s", vnni ? "true" : "false");
  if (vnni)
    printf(", \"gmac_512_1\": %.1f, \"gmac_512_n\": %.1f, \"gmac_256_1\": %.1f, \"gmac_256_n\": %.1f",
           peak(512, 1, seconds), peak(512, threads, seconds), peak(256, 1, seconds), peak(256, threads, seconds));
  printf(", \"read_gbs_1\": %.1f, \"read_gbs_n\": %.1f}\n", bandwidth(1, seconds, bytes), bandwidth(threads, seconds, bytes));
  return 0;
}
"""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(threads: int, seconds: float, mib: int) -> dict:
    """Build the probe and run it; its numbers and the CPU they were measured on."""
    if platform.machine() not in ("x86_64", "AMD64"):
        sys.exit("error: cpu_limits: the probes are x86 (AVX2/AVX-512) only")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        sys.exit("error: cpu_limits: no C compiler (cc) on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "probe.c", Path(tmp) / "probe"
        src.write_text(PROBE)
        built = subprocess.run([compiler, "-O2", "-fopenmp", str(src), "-o", str(exe)], capture_output=True, text=True)
        if built.returncode != 0:
            sys.exit(f"error: cpu_limits: {compiler} could not build the probe: {built.stderr.strip().splitlines()[-1]}")
        ran = subprocess.run([str(exe), str(threads), str(seconds), str(mib << 20)], capture_output=True, text=True,
                             env={**os.environ, "OMP_PROC_BIND": "spread"})
        if ran.returncode != 0:
            sys.exit(f"error: cpu_limits: the probe failed: {ran.stderr.strip()}")
    return {"cpu": cpu_name(), "threads": threads, **json.loads(ran.stdout)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of the N-thread runs")
    p.add_argument("--seconds", type=float, default=1.0, help="time per probe")
    p.add_argument("--mib", type=int, default=1024, help="buffer the bandwidth probe reads (far above the caches)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    for flag, value in (("--threads", args.threads), ("--seconds", args.seconds), ("--mib", args.mib)):
        if value <= 0:
            sys.exit(f"error: {flag} {value}: must be positive")
    r = measure(args.threads, args.seconds, args.mib)
    if args.json:
        print(json.dumps(r))
        return
    n = args.threads
    print(f"{r['cpu']}, {n} thread(s)")
    if r["avx512vnni"]:
        print(f"int8 dot-product peak (vpdpbusd), GMAC/s: 512-bit {r['gmac_512_1']} on 1 thread, {r['gmac_512_n']} "
              f"on {n}; 256-bit {r['gmac_256_1']} on 1, {r['gmac_256_n']} on {n}")
    else:
        print("no AVX-512 VNNI: the int8 dot-product probe is not run")
    print(f"read bandwidth, GB/s: {r['read_gbs_1']} on 1 thread, {r['read_gbs_n']} on {n}")


if __name__ == "__main__":
    main()
