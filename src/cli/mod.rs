//! The `lbw` command line: flag parsing and output formatting. Each command calls library code
//! that returns errors; only [`main`] turns an error into a message and an exit code.

/// `println!` for command output: a closed stdout (`lbw eval --json | head`) is an error that ends
/// the command quietly instead of a panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

/// `print!` counterpart of [`out!`].
macro_rules! out_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)?
    }};
}

mod bench;
mod calibrate;
mod detect;
mod eval;
mod finetune;
mod models;
pub(crate) mod quantize;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "lbw",
    version,
    about = "Low bit-width (power-of-two) object detectors: import, quantize, evaluate, serve"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Latency (p50/p90/p99), throughput, weight bytes and peak memory of a model variant.
    Bench(bench::BenchArgs),
    /// Quantize a model's convs to powers of two and calibrate 8-bit activation grids on images.
    Calibrate(calibrate::CalibrateArgs),
    /// Detect objects in images and print them (a table, or JSON lines with --json).
    Detect(detect::DetectArgs),
    /// Score detections (a model run or a saved file) on a VOC or COCO dataset: VOC AP and COCO AP.
    Eval(eval::EvalArgs),
    /// Retrain a model with its power-of-two quantizer in the loop (distillation from FP32).
    Finetune(finetune::FinetuneArgs),
    /// List the built-in models and whether their files are present and verified.
    Models(models::ModelsArgs),
    /// Import a model and write its internal graph as an ONNX file.
    ExportOnnx(models::ExportArgs),
    /// Post-training quantization of a model's convs to powers of two; writes a `.lbw` file.
    Quantize(quantize::QuantizeArgs),
    /// Quantize one float32 `.npy` tensor and write alpha * Q as `.npy`.
    QuantizeTensor(quantize::QuantizeTensorArgs),
    /// Serve detectors over HTTP: POST /detect, GET /v1/models, /healthz, /readyz, /metrics.
    Serve(serve::ServeArgs),
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // clap prints help/version to stdout with exit 0, and usage errors with exit 2.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_tracing();
    let result = match cli.command {
        Command::Bench(a) => bench::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Detect(a) => detect::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Finetune(a) => finetune::run(a),
        Command::Models(a) => models::run_list(a),
        Command::ExportOnnx(a) => models::run_export(a),
        Command::Quantize(a) => quantize::run(a),
        Command::QuantizeTensor(a) => quantize::run_tensor(a),
        Command::Serve(a) => serve::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The reader of our stdout went away (`| head`): not a failure of the command.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("LBW_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
