# termopar: the two commands are `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Development admin, created at start when no admin exists.
ADMIN_EMAIL ?= admin@termopar.local
ADMIN_PASSWORD ?= termopar-admin
export ADMIN_EMAIL ADMIN_PASSWORD

CARGO ?= cargo

# The services' URLs as scripts/services.sh found them (PostgreSQL may be on another port
# than 5432 when a cluster not ours holds it); a URL already in the environment wins.
WITH_SERVICES = set -a && eval "$$(scripts/services.sh env)" && set +a &&

.PHONY: help services services-down services-status run simulate test test-fuzz test-soak lint fmt ci bench bench-build bench-ingest bench-api bench-store bench-webhook bench-tracking bench-jobs bench-console bench-alarms docker-build images up down

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

services: ## Install (if missing) and start (if stopped) PostgreSQL, FerretDB, Mosquitto
	@scripts/services.sh up

services-down: ## Stop the development services
	@scripts/services.sh down

services-status: ## Show which development services answer
	@scripts/services.sh status

run: services ## Run the platform (edge mode: broker + consumer + API) on the dev services
	$(WITH_SERVICES) $(CARGO) run --release -p termopar --bin termopar

simulate: ## Publish simulated readings of two demo clients to a running `make run`
	$(CARGO) run --release -p termopar-device-sim -- $(ARGS)

test: services ## Run every test against real services
	$(WITH_SERVICES) $(CARGO) test --workspace --all-targets

test-fuzz: services ## Schemathesis on /openapi.json of a running edge node, as admin and viewer: 0 5xx, 0 schema violations, >= 10,000 requests
	$(WITH_SERVICES) scripts/fuzz.sh

# How long the soak runs, in seconds.
SOAK_SECS ?= 600

test-soak: services ## An edge node at half its measured ingest, buckets closing, reads alongside, for SOAK_SECS (600): RSS of the node and FerretDB flat, backlog and read p99 steady
	$(WITH_SERVICES) SOAK_SECS=$(SOAK_SECS) $(CARGO) test --workspace --test soak -- --ignored --nocapture

lint: ## Format check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

ci: lint test test-fuzz ## What CI runs: lint, the tests, then the fuzzer

bench: bench-ingest bench-api bench-store bench-webhook bench-tracking bench-jobs bench-console bench-alarms ## Every benchmark, each printed as a table with ratios to baselines

bench-build: services
	@scripts/services.sh bench-tools
	$(CARGO) build --release -p termopar-bench -p termopar-consumer -p termopar-broker -p termopar-api

bench-ingest: bench-build ## Ingest throughput, latency, pipeline alone, broker vs Mosquitto, RSS; the MQTT front (plain, TLS) vs rumqttd; a device fleet (BENCH_INGEST_ONLY=ingest,front,fleet)
	$(WITH_SERVICES) ./target/release/bench-ingest

bench-api: bench-build ## Latest reading (JWT, caches) vs /health
	$(WITH_SERVICES) ./target/release/bench-api

bench-store: bench-build ## History at 10k vs 5M readings, ingest vs the store's ceiling, slow sensors' bytes, store size, daily averages
	$(WITH_SERVICES) ./target/release/bench-store

bench-webhook: bench-build ## Webhook events/s with 32 senders vs a Django REST Framework baseline
	$(WITH_SERVICES) ./target/release/bench-webhook

bench-tracking: bench-build ## Tracking hits/s accepted and sustained (64 senders, single hits and 20-hit batches) vs DRF; kill -9 mid-load
	$(WITH_SERVICES) ./target/release/bench-tracking

bench-jobs: bench-build ## No-op jobs/s end to end and enqueue-to-start latency through the pipeline's job system vs a bare SKIP LOCKED queue
	$(WITH_SERVICES) ./target/release/bench-jobs

bench-alarms: bench-build ## Readings/s stored with 1,000 alarm rules over 1,000 sensors vs none, and stored → alarm committed latency
	$(WITH_SERVICES) ./target/release/bench-alarms

bench-console: bench-build ## Lighthouse scores (accessibility, performance, bytes) of the console's login, sensor list and sensor pages vs Swagger UI
	$(WITH_SERVICES) ./target/release/bench-console

docker-build: ## Build the container image
	docker build -t termopar:latest .

images: docker-build ## The image every service of docker-compose.yml runs (multi-stage, non-root, JSON logs)

up: ## Run the whole stack in containers
	docker compose up -d --build

down: ## Stop the container stack
	docker compose down
