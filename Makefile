# The two commands a new user runs: `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: deps test lint unit demo bench bench-report fmt clean-demo image image-test

## deps: install every real server the tests use into .deps/ (idempotent, cached in ~/.cache)
deps:
	@bash scripts/deps.sh

## lint: formatting and clippy, warnings are errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## test: deps, lint, then the whole suite against real servers
test: deps lint
	$(CARGO) build -p syncbridge-agent --bin syncbridge-agent
	$(CARGO) nextest run --workspace --no-fail-fast

## demo: run the agent end to end against throwaway servers with a file:// repository
demo: deps
	@bash scripts/demo.sh

## bench: side-by-side benchmarks against the peer tools (not part of `make test`), then
## bench-report/REPORT.md with its plots (rendered even when a bench failed; the exit
## status is the benches')
bench: deps
	$(CARGO) build --release -p syncbridge-agent
	@status=0; $(CARGO) bench --workspace --no-fail-fast || status=$$?; \
	SB_BENCH_PG_WAL_LOAD=pgbench $(CARGO) bench -p syncbridge-tests --bench pg_wal_stream || status=$$?; \
	$(CARGO) run --release -q -p syncbridge-tests --bin bench-report; exit $$status

## bench-report: render bench-report/REPORT.md again from the last results (target/bench-results)
bench-report:
	$(CARGO) run --release -q -p syncbridge-tests --bin bench-report

fmt:
	$(CARGO) fmt --all

## image: the OCI image (packaging/Containerfile) of the release binary, built with buildah
## (vfs storage under .buildah/, chroot isolation: no daemon, no registry); prints its size.
## Users with a registry and docker: see the Containerfile's header.
image: deps
	$(CARGO) build --release -p syncbridge-agent
	@bash packaging/image/build.sh

## image-test: build the image, then run it against real PostgreSQL and Redis (buildah run,
## host network). Not part of `make test` (the release build takes ~12 minutes on 2 cores),
## where tests/tests/packaging_image.rs shows as skipped.
image-test: image
	$(CARGO) nextest run -p syncbridge-tests --test packaging_image --run-ignored only --no-fail-fast
