"""Builds skynet._qkernels, the C matmul kernels behind skynet.quant (metadata is in pyproject.toml).

No -march flags: the AVX2 kernels are compiled per function and chosen at run time, so the same
build runs on any x86-64 or other CPU. -ffp-contract=off keeps the reference dequantizers exact; -fno-trapping-math lets loops with
float selects vectorize (exception flags may differ, values never do).
threads > 1 uses persistent POSIX workers of our own (no OpenMP: its idle threads spin on a core
that a node process on the same machine needs; ours spin ~200 µs, yielding, then block).
"""
import sys

from setuptools import Extension, setup

compile_args = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-std=c11"]
link_args = []
if sys.platform != "win32":   # pthreads serve threads > 1; Windows builds run single-threaded
    compile_args.append("-pthread")
    link_args.append("-pthread")

setup(ext_modules=[Extension("skynet._qkernels", ["src/skynet/_qkernels.c", "src/skynet/_link.c",
                                                       "src/skynet/_attn.c"],
                             depends=["src/skynet/_qkernels.h", "src/skynet/_attn_vec.h"],
                             extra_compile_args=compile_args, extra_link_args=link_args)])
