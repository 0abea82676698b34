# The agent-poller image: the binary alone, as a non-root numeric user.
# Build from the repository root: docker build -f deploy/poller.Dockerfile -t <registry>/poller:<tag> .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p agent-poller

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/agent-poller /usr/local/bin/agent-poller
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/agent-poller"]
