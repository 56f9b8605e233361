# syntax=docker/dockerfile:1.7
#
# Tollgate container images. Two targets share one build:
#
#   docker build --target gateway  -t tollgate-gateway  .
#   docker build --target operator -t tollgate-operator .
#
# Dependencies are compiled in their own layer (cargo-chef), so a source change rebuilds
# only Tollgate's crates. The final images are distroless and non-root: the binary, CA
# certificates and glibc, nothing else (no shell, no package manager). No HEALTHCHECK:
# Kubernetes probes /livez and /readyz (see the Helm chart).

ARG RUST_VERSION=1.95.0
ARG DEBIAN=bookworm

FROM docker.io/library/rust:${RUST_VERSION}-${DEBIAN} AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

# The dependency graph only (Cargo.toml files and Cargo.lock), as a recipe.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# Dependencies: cached until Cargo.toml or Cargo.lock change.
RUN cargo chef cook --release --locked --recipe-path recipe.json -p tollgate-gateway -p tollgate-operator
COPY . .
RUN cargo build --release --locked -p tollgate-gateway -p tollgate-operator \
    --bin tollgate-gateway --bin tollgate-operator

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.source="https://github.com/tollgate-dev/tollgate" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Tollgate" \
      org.opencontainers.image.version="${VERSION}"
# distroless "nonroot": uid/gid 65532, as the Helm chart's securityContext expects.
USER 65532:65532

FROM runtime AS operator
LABEL org.opencontainers.image.title="tollgate-operator" \
      org.opencontainers.image.description="Tollgate control plane: compiles Provider, RoutePolicy and ApiKey resources into gateway configuration"
COPY --from=builder /src/target/release/tollgate-operator /usr/local/bin/tollgate-operator
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/tollgate-operator"]
CMD ["run"]

# Last, so a plain `docker build .` produces the gateway.
FROM runtime AS gateway
LABEL org.opencontainers.image.title="tollgate-gateway" \
      org.opencontainers.image.description="Tollgate data plane: OpenAI- and Anthropic-compatible LLM gateway"
COPY --from=builder /src/target/release/tollgate-gateway /usr/local/bin/tollgate-gateway
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/tollgate-gateway"]
