# syntax=docker/dockerfile:1
# One image with every termopar binary; docker-compose.yml picks the command per service:
#   termopar (edge: broker + consumer + API), termopar-api, termopar-broker,
#   termopar-consumer, device-sim.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and build artefacts between image builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p termopar -p termopar-api -p termopar-broker \
        -p termopar-consumer -p termopar-device-sim \
    && mkdir -p /out \
    && cp target/release/termopar target/release/termopar-api target/release/termopar-broker \
          target/release/termopar-consumer target/release/device-sim /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 termopar
COPY --from=builder /out/ /usr/local/bin/
USER termopar
ENV LOG_FORMAT=json RUST_LOG=info
EXPOSE 8080 1883 8883
CMD ["termopar"]
