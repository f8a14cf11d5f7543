# Multi-stage build of the omni binary. Optional: nothing in this repository
# needs Docker; see README "Deploying".
#
# Dependencies (RocksDB and librdkafka among them, most of the build time)
# are compiled in a layer of their own from cargo-chef's recipe, which only
# Cargo.toml and Cargo.lock change: a source change rebuilds omni alone.
# Base images are pinned to exact tags; bump them together with the
# rust-version in Cargo.toml.
FROM rust:1.95.0-bookworm AS chef
RUN apt-get update && apt-get install -y --no-install-recommends \
      libclang-dev clang cmake libssl-dev zlib1g-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --locked --version 0.1.77
WORKDIR /src

FROM chef AS planner
COPY Cargo.toml Cargo.lock build.rs ./
COPY src src
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
RUN cargo build --release --locked --bin omni

FROM debian:12.12-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 libstdc++6 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/omni omni && mkdir -p /var/lib/omni && chown omni /var/lib/omni
COPY --from=build /src/target/release/omni /usr/local/bin/omni
COPY topologies /etc/omni
# A fixed numeric user, so Kubernetes' runAsNonRoot and fsGroup can name it.
USER 10001
WORKDIR /var/lib/omni
ENV OMNI_STATE_DIR=/var/lib/omni/state OMNI_HTTP_LISTEN=0.0.0.0:9464
# 9464: omni run's /metrics, /healthz, /readyz; 50051: omni serve (gRPC and HTTP).
EXPOSE 9464 50051
# `omni health` reads OMNI_HTTP_LISTEN and asks /healthz on loopback (no curl in a slim image).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["omni", "health", "--timeout-secs", "4"]
ENTRYPOINT ["omni"]
CMD ["run", "--topology", "/etc/omni/room-state.toml"]
