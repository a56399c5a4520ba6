#!/usr/bin/env bash
# On this machine, before a device run (the GPU machine has no network): the kit's wheels (open_clip and what it
# needs, into .whl/) plus pytest-xdist and execnet, which `bench/device/run.sh S` uses to run the whole test suite
# on 8 workers. Then call the device tool with carry [".whl"] and `bash bench/device/run.sh Q` (or A, B, C, S).
set -eu
bash ../shared/gpu/kit/prep.sh
for spec in pytest-xdist==3.8.0 execnet==2.1.2; do
  python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "$spec" 2>&1 | grep -v "is ignored" || true
done
ls .whl
