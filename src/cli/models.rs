use std::path::PathBuf;

use clap::Args;

use crate::model::{load_builtin, manifest, onnx};

#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run_list(args: ModelsArgs) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for m in manifest::builtin()? {
        let status = match load_builtin(&m.id) {
            Ok(model) => format!(
                "ok: {} nodes, {} parameters, {:.3} G MACs",
                model.graph.nodes.len(),
                model.graph.parameter_count(),
                model.graph.conv_macs()? as f64 / 1e9
            ),
            Err(e) => format!("unavailable: {e}"),
        };
        rows.push(serde_json::json!({
            "id": m.id, "format": m.format, "input": [m.input.width, m.input.height],
            "classes": m.labels.len(), "license": m.license, "status": status,
        }));
        if !args.json {
            out!(
                "{:<28} {:<8} {}x{}  {}",
                m.id,
                format!("{:?}", m.format).to_lowercase(),
                m.input.width,
                m.input.height,
                status
            );
        }
    }
    if args.json {
        out!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Model id.
    #[arg(long)]
    pub model: String,
    /// Output ONNX file.
    #[arg(short, long)]
    pub output: PathBuf,
}

pub fn run_export(args: ExportArgs) -> anyhow::Result<()> {
    let model = load_builtin(&args.model)?;
    let bytes = onnx::to_onnx_bytes(&model.graph)?;
    std::fs::write(&args.output, &bytes).map_err(|e| crate::Error::io(&args.output, e))?;
    eprintln!("wrote {} ({} bytes)", args.output.display(), bytes.len());
    Ok(())
}
