# The agent-updater image: the binary alone, as a non-root numeric user.
# Build from the repository root: docker build -f deploy/updater.Dockerfile -t <registry>/updater:<tag> .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p agent-updater

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/agent-updater /usr/local/bin/agent-updater
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/agent-updater"]
