# Each target makes its own virtualenv on first use, so a fresh clone needs
# nothing but python3 (>= 3.9) and access to PyPI.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(wildcard protos/*.proto)
GEN    := $(PROTOS:.proto=_pb2.py)

.PHONY: all demo test bench clean
all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# With typed stubs beside them (mypy-protobuf: %_pb2.pyi, %_pb2_grpc.pyi), so a
# program using them type-checks (tests/test_typing.py).
protos/%_pb2.py: protos/%.proto $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=. \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=. $<

demo: $(STAMP) $(GEN)
	$(BIN)/python -m client_example --demo

test: $(STAMP) $(GEN)
	$(BIN)/python -m pytest -q tests

# Four parts, ~25-30 minutes on 2 cores (shmgrpc/tools/bench.py, bufbench.py);
# each writes report.txt and results.json in its --out, the first three also
# speedup.png and throughput.png:
# 1. every message and RPC shape, three malloc phases (default, keep,
#    hugepages; each a process of its own), sync gRPC on both sides
#    (BENCH_APIS=sync,aio adds grpc.aio to all of it, doubling the time);
# 2. the unary bytes echo at 4 KiB, 1, 4 and 16 MiB in every api mix (sync,
#    aio, aio-sync, sync-aio), all transports, default malloc: the small-call
#    and grpc.aio numbers of the README, in bench-results/apis;
# 3. the unary bytes echo, 4 KiB to 256 MiB, sync and grpc.aio, three malloc
#    phases, plain gRPC over unix and each transport, nine rounds a cell (a
#    shared machine's noise): the README's picture (docs/bench-speedup.png),
#    bench-results/speedup/speedup.png, ~10 minutes;
# 4. a numpy array one way at 1, 16, 64 and 256 MiB: plain gRPC, the drop-in
#    path with a protobuf bytes field, and the buffer codec
#    (shmgrpc.buffer_serializer), in bench-results/buffers, ~1 minute.
BENCH_APIS ?= sync
bench: $(STAMP) $(GEN)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[plot,numpy]'
	$(BIN)/python -m shmgrpc.tools.bench --malloc default,keep,hugepages --apis $(BENCH_APIS) --out bench-results
	$(BIN)/python -m shmgrpc.tools.bench --apis sync,aio,aio-sync,sync-aio --shapes unary --messages bytes \
		--sizes 4KiB,1MiB,4MiB,16MiB --out bench-results/apis
	$(BIN)/python -m shmgrpc.tools.bench --apis sync,aio --shapes unary --messages bytes \
		--modes grpc-unix,memfd,shm,cma --malloc default,keep,hugepages --repeat 9 --out bench-results/speedup
	$(BIN)/python -m shmgrpc.tools.bufbench --out bench-results/buffers

clean:
	rm -rf $(VENV) $(GEN) $(PROTOS:.proto=_pb2_grpc.py) $(PROTOS:.proto=_pb2.pyi) $(PROTOS:.proto=_pb2_grpc.pyi) \
		bench-results
