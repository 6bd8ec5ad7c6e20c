# syntax=docker/dockerfile:1
# One image with every termopar binary; docker-compose.yml picks the command per service.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# Dependencies first, so code changes do not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY core/Cargo.toml core/Cargo.toml
COPY api/Cargo.toml api/Cargo.toml
COPY test-support/Cargo.toml test-support/Cargo.toml
RUN for c in core api test-support; do mkdir -p $c/src && echo "" > $c/src/lib.rs; done \
    && echo "fn main() {}" > api/src/main.rs \
    && mkdir -p migrations \
    && cargo build --release -p termopar-api || true
COPY . .
RUN touch core/src/lib.rs api/src/lib.rs api/src/main.rs \
    && cargo build --release --bins \
    && mkdir -p /out \
    && find target/release -maxdepth 1 -type f -executable -name 'termopar*' -exec cp {} /out/ \;

FROM debian:bookworm-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 termopar
COPY --from=builder /out/ /usr/local/bin/
USER termopar
ENV LOG_FORMAT=json RUST_LOG=info API_ADDR=0.0.0.0:8080
EXPOSE 8080
CMD ["termopar-api"]
