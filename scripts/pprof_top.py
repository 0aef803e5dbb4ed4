#!/usr/bin/env python3
"""Reads a Go CPU profile (pprof's gzipped profile.proto) without the Go toolchain.

Prints the CPU time per function, flat (own time) and cumulative, and optionally who calls
a function. Used on SeaweedFS, whose released binary is stripped (perf shows addresses
only) but serves symbolised profiles with `-debug -debug.port=PORT`; see
benches/README.md, redis_capture.

  curl -so weed.pprof 'http://127.0.0.1:PORT/debug/pprof/profile?seconds=30'
  scripts/pprof_top.py weed.pprof [TOP [FUNCTION_SUBSTRING [DEPTH]]]
"""
import collections
import gzip
import sys


def varint(b, i):
    r = s = 0
    while True:
        c = b[i]
        i += 1
        r |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return r, i


def fields(b):
    """(field number, wire type, value) of one protobuf message."""
    i = 0
    while i < len(b):
        k, i = varint(b, i)
        f, w = k >> 3, k & 7
        if w == 0:
            v, i = varint(b, i)
        elif w == 2:
            n, i = varint(b, i)
            v = b[i : i + n]
            i += n
        elif w == 1:
            v = b[i : i + 8]
            i += 8
        elif w == 5:
            v = b[i : i + 4]
            i += 4
        else:
            raise ValueError(f"wire type {w}")
        yield f, w, v


def packed(w, v):
    if w == 0:
        return [v]
    out, i = [], 0
    while i < len(v):
        x, i = varint(v, i)
        out.append(x)
    return out


def main():
    data = gzip.decompress(open(sys.argv[1], "rb").read())
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    strings, samples, locs, funcs, types = [], [], {}, {}, []
    # profile.proto: 1 sample_type, 2 sample, 4 location, 5 function, 6 string_table.
    for f, w, v in fields(data):
        if f == 6:
            strings.append(v.decode(errors="replace"))
        elif f == 1:
            types.append(dict((g, x) for g, _, x in fields(v)))
        elif f == 2:
            ls, vals = [], []
            for g, w2, x in fields(v):
                if g == 1:
                    ls += packed(w2, x)
                elif g == 2:
                    vals += packed(w2, x)
            samples.append((ls, vals))
        elif f == 4:
            lid, lines = 0, []
            for g, _, x in fields(v):
                if g == 1:
                    lid = x
                elif g == 4:
                    lines += [y for h, _, y in fields(x) if h == 1]
            locs[lid] = lines
        elif f == 5:
            d = dict((g, x) for g, _, x in fields(v))
            funcs[d.get(1, 0)] = d.get(2, 0)
    # The last sample type is CPU nanoseconds in Go's CPU profiles.
    vi = len(types) - 1
    stacks = [([strings[funcs[fid]] for l in ls for fid in locs[l]], vals[vi]) for ls, vals in samples]
    flat, cum = collections.Counter(), collections.Counter()
    total = sum(v for _, v in stacks)
    for stack, v in stacks:
        if stack:
            flat[stack[0]] += v
        for fn in set(stack):
            cum[fn] += v
    print(f"total {total / 1e9:.2f} s")
    for title, counter in (("flat", flat), ("cumulative", cum)):
        print(f"== {title}")
        for k, v in counter.most_common(top):
            print(f"{v / 1e9:7.2f}s {100 * v / total:5.1f}%  {k}")
    if len(sys.argv) > 3:
        target, depth = sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 5
        callers = collections.Counter()
        for stack, v in stacks:
            for i, fn in enumerate(stack):
                if target in fn:
                    callers[" <- ".join(s.split("/")[-1] for s in stack[i : i + depth])] += v
                    break
        print(f"== callers of {target}")
        for k, v in callers.most_common(15):
            print(f"{v / 1e9:7.2f}s  {k}")


if __name__ == "__main__":
    main()
