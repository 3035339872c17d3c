use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::model::DEFAULT_MODEL;
use crate::serve::{DEFAULT_MAX_BODY_BYTES, ServeConfig, ServeOptions, default_inference_threads};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model to serve: ID or ID@VARIANT (fp32: FP32 on tract; lbw2 .. lbw8: power-of-two weights
    /// quantized at start-up, on the shift-add engine), or the path of a `.lbw` file. Repeat to
    /// serve several side by side; the first answers requests that name no model.
    #[arg(
        long = "model",
        value_name = "ID[@VARIANT]",
        default_value = DEFAULT_MODEL,
        env = "LBW_MODELS",
        value_delimiter = ','
    )]
    pub models: Vec<String>,
    /// Address and port to listen on.
    #[arg(long, default_value = "0.0.0.0:8080", env = "LBW_ADDR")]
    pub addr: SocketAddr,
    /// Images decoded and detected at once [default: available cores].
    #[arg(long, env = "LBW_INFERENCE_THREADS",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub inference_threads: Option<u16>,
    /// Largest accepted request body, in bytes; larger uploads get 413.
    #[arg(long, default_value_t = DEFAULT_MAX_BODY_BYTES, env = "LBW_MAX_BODY_BYTES")]
    pub max_body_bytes: usize,
    /// Milliseconds a request waits for a free inference thread before it gets 503.
    #[arg(long, default_value_t = 10_000, env = "LBW_QUEUE_TIMEOUT_MS")]
    pub queue_timeout_ms: u64,
    /// Seconds a whole request may take, upload included, before it gets 408.
    #[arg(long, default_value_t = 60, env = "LBW_REQUEST_TIMEOUT_S",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_s: u64,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServeConfig {
        addr: args.addr,
        models: args.models,
        options: ServeOptions {
            inference_threads: args
                .inference_threads
                .map_or_else(default_inference_threads, usize::from),
            max_body_bytes: args.max_body_bytes,
            queue_timeout: Duration::from_millis(args.queue_timeout_ms),
            request_timeout: Duration::from_secs(args.request_timeout_s),
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lbw-serve")
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(crate::serve::run(config));
    // A model still loading, or a detection whose client is gone, must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_secs(5));
    Ok(result?)
}
