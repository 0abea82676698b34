# The agent-updater image: the binary alone, as a non-root numeric user.
# Build from the repository root: docker build -f deploy/updater.Dockerfile -t <registry>/updater:<tag> .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# deploy/build.sh: the release profile, glibc linked statically (see the script).
RUN cp "$(bash deploy/build.sh --locked -p agent-updater)/agent-updater" /agent-updater

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /agent-updater /usr/local/bin/agent-updater
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/agent-updater"]
