# Build: docker build -t lbw .
# Run:   docker run -p 8080:8080 -v /path/to/shared/models:/models:ro lbw
# The image holds no weights: mount the model folder (one sub-folder per model id, as in
# shared/models) at /models. Files are checked against the sha256 in models/*.toml at start-up.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY models ./models
COPY benches ./benches
RUN cargo build --release --locked --bin lbw

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 lbw
COPY --from=build /src/target/release/lbw /usr/local/bin/lbw
ENV LBW_MODEL_DIR=/models LBW_LOG=info
USER lbw
EXPOSE 8080
ENTRYPOINT ["lbw"]
CMD ["serve", "--addr", "0.0.0.0:8080"]
