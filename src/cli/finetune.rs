//! `lbw finetune`: retrain a detector with its power-of-two quantizer in the loop.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use crate::quant::Bits;
use crate::quant::Method;
use crate::train::checkpoint::Checkpoint;
use crate::train::{
    DEFAULT_BATCH, DEFAULT_LR, DEFAULT_VIA_BITS, FinetuneConfig, FinetuneSummary, TrainDevice,
    default_final_steps, finetune,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AlphaArg {
    Learned,
    Rule,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SelectArg {
    Last,
    Best,
}

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// Model id (see `lbw models`): the FP32 teacher and the starting weights.
    #[arg(long)]
    pub model: String,
    #[command(flatten)]
    pub quantizer: crate::cli::quantize::QuantizerArgs,
    /// How the weights' scales are set during training: `learned` trains them (one per output
    /// channel, or per tensor with --per-tensor) from the method's starting values; `rule`
    /// recomputes them from the weights at every step, as the method does after training.
    #[arg(long, value_enum, default_value_t = AlphaArg::Learned)]
    pub alphas: AlphaArg,
    /// Keep this conv (node or weight name) at full precision; repeatable.
    #[arg(long = "keep")]
    pub keep: Vec<String>,
    /// Folder of training photos (searched recursively, no labels needed); repeatable.
    #[arg(long = "images", required_unless_present = "labels")]
    pub images: Vec<PathBuf>,
    /// VOC folder (Annotations/*.xml beside JPEGImages/): its photos join the training set and
    /// also get the YOLOv3 detection loss on their boxes (YOLOv3 models only); repeatable.
    #[arg(long = "labels")]
    pub labels: Vec<PathBuf>,
    /// Weight of the labelled loss against the distillation loss.
    #[arg(long, default_value_t = crate::train::yolo_loss::DEFAULT_LABEL_WEIGHT)]
    pub label_weight: f64,
    /// Weights of the distillation terms for YOLOv3 heads, as OBJ,CLS,BOX: objectness KL at every
    /// anchor, class KL (summed over classes) and box error, both weighted by the teacher's
    /// objectness.
    #[arg(long, default_value = "1,1,5")]
    pub loss_weights: crate::train::TermWeights,
    /// Optimiser steps (of the first stage, in a staged run) [default: 3000, about 30 minutes for
    /// yolo-fastest-voc on 2 cores].
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u64>,
    /// Passes over the photos, instead of --steps.
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Images per step.
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    pub batch: usize,
    /// Peak learning rate (Adam), relative to each tensor's RMS; reached after the warm-up, then
    /// decayed by a cosine.
    #[arg(long, default_value_t = DEFAULT_LR)]
    pub lr: f64,
    /// Warm-up steps [default: 5 % of the run].
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Seed for the image order and augmentation: the same seed gives the same run.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Training input side, a multiple of 32 [default: 256, or the model's input if smaller].
    #[arg(long)]
    pub resolution: Option<u32>,
    /// Feed the photos without random crops, flips or colour jitter.
    #[arg(long)]
    pub no_augment: bool,
    /// Keep activations in FP32 during training (default: 8-bit fake quantization as the
    /// shift-add engine computes).
    #[arg(long)]
    pub fp32_activations: bool,
    /// Continue from a checkpoint (its schedule, batch, seed and learning rate are used).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Start the student from this `.lbw` of the same model instead of the FP32 weights, e.g. a
    /// bit-width from a retrained lower one (its weights, and its alphas where they fit); the
    /// teacher stays the FP32 model.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Train the whole schedule at this bit-width first, then finish at --bits from its result
    /// (`none`: train at --bits throughout) [default: 4 for --bits 5 to 8 with learned alphas, from
    /// the FP32 weights; none otherwise]. The first stage is written as OUTPUT.via4.lbw.
    #[arg(long)]
    pub via_bits: Option<String>,
    /// Steps of the final stage of a staged run [default: a tenth of the first stage's].
    #[arg(long)]
    pub final_steps: Option<u64>,
    /// Checkpoint file [default: OUTPUT.ckpt].
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: u64,
    /// JSON-lines training log [default: OUTPUT.log.jsonl].
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Stop after this many steps (checkpoint written); continue later with --resume. With 0 and
    /// --holdout, measures the starting weights' held-out loss (e.g. of an --init file) alone.
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// Where to train.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Keep N photos out of training and measure the distillation loss on them (no augmentation)
    /// before the first step, every --validate-every steps and after the last; logged as
    /// `holdout_loss`. The same photos of the same folders whatever the seed, so runs compare. The
    /// parameters with the lowest held-out loss are written as OUTPUT.best.lbw.
    #[arg(long, default_value_t = 0)]
    pub holdout: usize,
    /// Steps between held-out measurements [default: a tenth of the run].
    #[arg(long)]
    pub validate_every: Option<u64>,
    /// Which parameters the output holds: the last step's, or those with the lowest held-out loss
    /// (needs --holdout; in a staged run, each stage's best).
    #[arg(long, value_enum, default_value_t = SelectArg::Last)]
    pub select: SelectArg,
    /// Keep the weights that are zero in the --init file (in a staged run: in the first stage's
    /// file) at zero while training; the shift-add engine skips zero weights.
    #[arg(long)]
    pub keep_zeros: bool,
    /// Output `.lbw` file.
    #[arg(short = 'o', long)]
    pub output: PathBuf,
}

pub fn run(args: FinetuneArgs) -> anyhow::Result<()> {
    let bits = Bits::new(args.quantizer.bits)?;
    let mut cfg = FinetuneConfig::new(&args.model, bits, args.images, args.output);
    cfg.method = args.quantizer.method;
    cfg.param = args.quantizer.param;
    cfg.per_channel = args.quantizer.per_channel();
    cfg.learned_alphas = args.alphas == AlphaArg::Learned;
    cfg.keep_full_precision = args.keep;
    cfg.label_dirs = args.labels;
    cfg.label_weight = args.label_weight;
    cfg.loss_weights = args.loss_weights;
    cfg.steps = args.steps;
    cfg.epochs = args.epochs;
    cfg.batch = args.batch;
    cfg.lr = args.lr;
    cfg.warmup_steps = args.warmup;
    cfg.seed = args.seed;
    cfg.resolution = args.resolution;
    cfg.augment = !args.no_augment;
    cfg.fake_quant_activations = !args.fp32_activations;
    cfg.resume = args.resume;
    cfg.init = args.init;
    cfg.checkpoint = args.checkpoint;
    cfg.checkpoint_every = args.checkpoint_every;
    cfg.log = args.log;
    cfg.stop_after = args.stop_after;
    cfg.holdout = args.holdout;
    cfg.validate_every = args.validate_every;
    cfg.select_best = args.select == SelectArg::Best;
    cfg.keep_zeros = args.keep_zeros;
    cfg.device = match args.device {
        DeviceArg::Cpu => TrainDevice::Cpu,
        DeviceArg::Cuda => TrainDevice::Cuda,
    };
    let staged = match args.via_bits.as_deref() {
        Some("none") => None,
        Some(v) => {
            let via = v.parse::<u8>().ok().and_then(|b| Bits::new(b).ok());
            Some(via.ok_or_else(|| {
                anyhow::anyhow!("--via-bits must be a bit-width in 2..=8 or `none`, got {v:?}")
            })?)
        }
        None => (bits.get() > DEFAULT_VIA_BITS
            && cfg.learned_alphas
            && cfg.init.is_none()
            && cfg.method != Method::Ternary)
            .then(|| Bits::new(DEFAULT_VIA_BITS))
            .transpose()?,
    };
    if args.final_steps == Some(0) {
        anyhow::bail!("--final-steps must be at least 1");
    }
    let Some(via) = staged.filter(|v| *v != bits) else {
        if args.final_steps.is_some() {
            anyhow::bail!(
                "--final-steps applies to a staged run; this one has one stage (--via-bits)"
            );
        }
        return run_stage(&cfg).map(|_| ());
    };
    // A checkpoint of the final stage resumes that stage alone.
    if let Some(ck) = &cfg.resume
        && Checkpoint::read(ck)?.header.bits == bits.get()
    {
        return run_stage(&cfg).map(|_| ());
    }
    let first = cfg.first_stage(via);
    eprintln!(
        "stage 1 of 2: {via} bits ({}), then {bits} bits from its weights",
        first.output.display()
    );
    let s1 = run_stage(&first)?;
    let Some(init) = s1.output else {
        return Ok(());
    };
    let mut last = cfg.final_stage(
        init,
        args.final_steps
            .unwrap_or_else(|| default_final_steps(s1.total_steps)),
    );
    if let Some(n) = cfg.stop_after {
        let left = n.saturating_sub(s1.end_step - s1.start_step);
        if left == 0 {
            eprintln!(
                "stopped after the first stage; continue with --resume {}",
                s1.checkpoint.display()
            );
            return Ok(());
        }
        last.stop_after = Some(left);
    }
    eprintln!("stage 2 of 2: {bits} bits");
    run_stage(&last).map(|_| ())
}

/// One `finetune` call with a progress bar; prints its summary (a JSON line on stdout).
fn run_stage(cfg: &FinetuneConfig) -> anyhow::Result<FinetuneSummary> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} training [{bar:30}] step {pos}/{len}, {msg}, {elapsed} elapsed, eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let summary = finetune(cfg, &mut |r| {
        if let Some(h) = r.holdout_loss {
            bar.println(format!("step {}: held-out loss {h:.4}", r.step));
        }
        if bar.length() != Some(r.total_steps) {
            bar.set_length(r.total_steps);
            bar.set_position(r.step.saturating_sub(1));
            bar.reset_eta();
        }
        let labelled = r
            .loss
            .labelled
            .map_or(String::new(), |l| format!(" labelled {:.4}", l.total));
        bar.set_message(format!(
            "loss {:.4} (obj {:.4} cls {:.4} box {:.4}{labelled}), lr {:.2e}, {:.2} img/s",
            r.loss.total, r.loss.objectness, r.loss.class, r.loss.bbox, r.lr, r.images_per_s
        ));
        bar.set_position(r.step);
    })?;
    bar.finish_and_clear();
    eprintln!(
        "trained steps {}..{} of {} in {:.0} s ({:.2} images/s); loss {} -> {}",
        summary.start_step,
        summary.end_step,
        summary.total_steps,
        summary.wall_s,
        summary.images_per_s,
        summary
            .initial_loss
            .map_or("-".into(), |l| format!("{l:.4}")),
        summary.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
    );
    if let Some(b) = summary.best_holdout {
        eprintln!(
            "held-out loss on {} photos: {} before training, {} now, lowest {:.4} after step {} ({})",
            summary.holdout_photos,
            summary
                .initial_holdout_loss
                .map_or("-".into(), |l| format!("{l:.4}")),
            summary
                .holdout_loss
                .map_or("-".into(), |l| format!("{l:.4}")),
            b.loss,
            b.step,
            cfg.best_path().display()
        );
    }
    match &summary.output {
        Some(p) => eprintln!("wrote {}", p.display()),
        None => eprintln!(
            "stopped before the end of the schedule; continue with --resume {}",
            summary.checkpoint.display()
        ),
    }
    out!("{}", serde_json::to_string(&summary)?);
    Ok(summary)
}
