# One image with every binary of the checkout: the five services, the outbox
# relay, the HTTP gateway, shop-timeline, shop-dlq, shop-healthcheck and
# shop-local. Compose picks the binary per container with `command`.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
    && mkdir /out \
    && cp target/release/order-service target/release/inventory-service \
          target/release/payment-service target/release/notification-service \
          target/release/user-service target/release/outbox-relay \
          target/release/shop-dlq target/release/shop-healthcheck \
          target/release/shop-local target/release/shop-gateway \
          target/release/shop-timeline /out/

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 shop \
    && useradd --system --uid 10001 --gid 10001 --no-create-home shop
COPY --from=build /out/ /usr/local/bin/
# Numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
