# syntax=docker/dockerfile:1
# The kubetwin operator image: a static cmd/manager on distroless, non-root.
#
#   docker build -t ghcr.io/kubetwin/kubetwin:v0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/kubetwin/kubetwin:v0.1.0 --push .
#
# The development machines have no container engine, so CI does not build the image; test/helm checks the
# recipe instead (what it copies, its go build run as written gives a static binary, the final stage). What
# the chart and config/manager expect of it: the binary at /manager, user 65532, nothing written outside the
# mounted webhook certificate folder (the root filesystem is read-only), ports 8883 (MQTT over TLS), 1883
# (plain MQTT, only with --mqtt-bind-address), 8081 (probes), 8443 (metrics), 9443 (webhooks) and 10443 (the
# service API).

ARG GO_VERSION=1.26

FROM --platform=$BUILDPLATFORM golang:${GO_VERSION} AS builder
ARG TARGETOS
ARG TARGETARCH
WORKDIR /src
# Modules first, so a source change does not download them again.
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY api/ api/
COPY cmd/ cmd/
COPY controllers/ controllers/
COPY internal/ internal/
COPY pkg/ pkg/
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=${TARGETOS:-linux} GOARCH=${TARGETARCH} \
    go build -trimpath -ldflags "-s -w" -o /out/manager ./cmd/manager

FROM gcr.io/distroless/static:nonroot
LABEL org.opencontainers.image.title="kubetwin" \
      org.opencontainers.image.description="Kubernetes operator for IoT device twins over MQTT" \
      org.opencontainers.image.source="https://github.com/kubetwin/kubetwin"
WORKDIR /
COPY --from=builder /out/manager /manager
USER 65532:65532
EXPOSE 8883 1883 8081 8443 9443 10443
ENTRYPOINT ["/manager"]
