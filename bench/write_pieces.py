"""How the size of each write() call changes the cost of writing 2 GB into the page cache on this machine.

    .venv/bin/python bench/write_pieces.py 262144      # 256 KiB pieces, as StreamingSafetensorsWriter writes
    .venv/bin/python bench/write_pieces.py 60000000    # one write per stacked expert tensor, as it wrote before

Writes 2 GiB from one reused 64 MB buffer into /tmp/write-pieces.out in pieces of the given size, prints wall, user
and system seconds, deletes the file. Results: docs/benchmarks.md (issue 23's runs).
"""

import os
import sys
import time

import numpy as np

piece = int(sys.argv[1])
total = 2 << 30
source = np.ones(64 << 20, dtype=np.uint8)
out = "/tmp/write-pieces.out"
started, before = time.perf_counter(), os.times()
with open(out, "wb") as handle:
    done = 0
    while done < total:
        view = memoryview(source)[: min(piece, total - done)]
        handle.write(view)
        done += len(view)
after = os.times()
wall = time.perf_counter() - started
user, system = after.user - before.user, after.system - before.system
print(f"{piece >> 10} KiB pieces: wall {wall:.2f} s, user {user:.2f} s, system {system:.2f} s")
os.unlink(out)
