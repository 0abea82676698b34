# The agent-poller image: the binary alone, as a non-root numeric user.
# Build from the repository root: docker build -f deploy/poller.Dockerfile -t <registry>/poller:<tag> .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# deploy/build.sh: the release profile, glibc linked statically (see the script).
RUN cp "$(bash deploy/build.sh --locked -p agent-poller)/agent-poller" /agent-poller

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /agent-poller /usr/local/bin/agent-poller
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/agent-poller"]
