# subgate container image (README, "Running in Docker").
#   docker build -t subgate .
#   docker run -p 8080:8080 -v subgate-data:/var/lib/subgate -e SUBGATE__AMQP__URL=… subgate

FROM rust:1-bookworm AS build
# cmake for aws-lc-sys (the TLS crypto provider) where its build asks for it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin subgate

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/subgate --shell /usr/sbin/nologin subgate \
 && install -d -o subgate -g subgate -m 0750 /var/lib/subgate
COPY --from=build /src/target/release/subgate /usr/local/bin/subgate
ENV SUBGATE__HTTP__ADDR=0.0.0.0:8080 \
    SUBGATE__STORE__URL=sqlite:///var/lib/subgate/subgate.db \
    SUBGATE__LOG__FORMAT=json
USER subgate
WORKDIR /var/lib/subgate
VOLUME ["/var/lib/subgate"]
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/subgate"]
CMD ["serve"]
