# syntax=docker/dockerfile:1
# The gateway as a container image:
#   docker build -t order-gateway .
#   docker run -p 50051:50051 -v "$PWD/tokens.toml:/etc/order-gateway/tokens.toml:ro" \
#     -e ORDER_GATEWAY_AUTH_TOKENS=/etc/order-gateway/tokens.toml order-gateway
# It listens on every interface, so `serve` refuses to start without authentication
# (--auth-tokens / --jwt-public-key) unless ORDER_GATEWAY_INSECURE=true says otherwise.
# See docs/operations.md.

# Build stage: a virtualenv with the gateway and its dependencies.
FROM python:3.11-slim AS build
# Optional extras to install, e.g. "otel" (tracing; the default) or "" for none.
ARG EXTRAS=otel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/order-gateway
WORKDIR /src
COPY pyproject.toml README.md ./
COPY domain ./domain
COPY server ./server
COPY generated ./generated
RUN /opt/order-gateway/bin/pip install ".${EXTRAS:+[$EXTRAS]}"

# Runtime stage: the virtualenv alone, run by an unprivileged user.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --create-home \
        --home-dir /var/lib/order-gateway gateway
COPY --from=build /opt/order-gateway /opt/order-gateway
ENV PATH=/opt/order-gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ORDER_GATEWAY_LISTEN=0.0.0.0:50051 \
    ORDER_GATEWAY_METRICS_LISTEN=0.0.0.0:9090 \
    ORDER_GATEWAY_STORE=sqlite:////var/lib/order-gateway/order-gateway.db \
    ORDER_GATEWAY_LOG_FORMAT=json
# A numeric user, so that orchestrators (Kubernetes runAsNonRoot) can verify it.
USER 10001:10001
WORKDIR /var/lib/order-gateway
# The SQLite store's home; use PostgreSQL (ORDER_GATEWAY_STORE) for several replicas.
VOLUME ["/var/lib/order-gateway"]
# 50051: gRPC; 9090: Prometheus metrics at /metrics.
EXPOSE 50051 9090
# Asks the gRPC health service (grpc.health.v1) on this container's --listen port:
# healthy only while it answers SERVING (it turns NOT_SERVING on SIGTERM).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["order-gateway", "health", "--timeout", "4"]
# serve stops gracefully on SIGTERM (docker stop), within ORDER_GATEWAY_SHUTDOWN_GRACE.
STOPSIGNAL SIGTERM
ENTRYPOINT ["order-gateway"]
CMD ["serve"]
