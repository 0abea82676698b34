# The agent-executor image: the binary and the helm v4 binary it drives, as a non-root numeric
# user. HELM_VERSION stays equal to tests/env/versions.env (a test checks it).
# Build from the repository root: docker build -f deploy/executor.Dockerfile -t <registry>/executor:<tag> .
ARG HELM_VERSION=v4.2.4

FROM golang:1.26-bookworm AS helm
ARG HELM_VERSION
ENV CGO_ENABLED=0 GOFLAGS=-trimpath
RUN go install -ldflags "-s -w" "helm.sh/helm/v4/cmd/helm@${HELM_VERSION}"

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# deploy/build.sh: the release profile, glibc linked statically (see the script).
RUN cp "$(bash deploy/build.sh --locked -p agent-executor)/agent-executor" /agent-executor

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=helm /go/bin/helm /usr/local/bin/helm
COPY --from=build /agent-executor /usr/local/bin/agent-executor
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/agent-executor"]
