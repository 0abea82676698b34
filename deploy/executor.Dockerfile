# The executor image: the agent-executor binary and the helm v4 binary it runs (the manifest's
# AGENT_HELM_BIN), run as the numeric non-root user 65532.
#
# No base image: the binaries are static (deploy/build.sh links glibc statically; helm is a Go
# binary built with CGO_ENABLED=0), and the root holds only what they read at run time
# (deploy/rootfs: passwd, group, nsswitch.conf; a CA bundle for https; an empty /tmp).
# The build context is the directory deploy/context.sh assembles, one binaries directory per
# architecture, picked by TARGETARCH:
#   docker buildx build --platform linux/amd64,linux/arm64 -f deploy/executor.Dockerfile <context>
#   buildah build --platform linux/amd64 -f deploy/executor.Dockerfile <context>  (tests/env/images.sh)
FROM scratch
ARG TARGETARCH
COPY rootfs/ /
COPY ${TARGETARCH}/agent-executor ${TARGETARCH}/helm /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/agent-executor"]
