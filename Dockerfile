# Multi-stage build of the omni binary. Optional: nothing in this repository
# needs Docker; see README "Deploying".
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
      libclang-dev clang cmake libssl-dev libsasl2-dev zlib1g-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
RUN cargo build --release --locked --bin omni

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 libsasl2-2 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/omni omni && mkdir -p /var/lib/omni && chown omni /var/lib/omni
COPY --from=build /src/target/release/omni /usr/local/bin/omni
COPY topologies /etc/omni
USER omni
WORKDIR /var/lib/omni
ENV OMNI_STATE_DIR=/var/lib/omni/state OMNI_HTTP_LISTEN=0.0.0.0:9464
EXPOSE 9464
ENTRYPOINT ["omni"]
CMD ["run", "--topology", "/etc/omni/room-state.toml"]
