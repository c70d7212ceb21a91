//! `fusion_bench`: FusionBench's command line, on libtorch.
//!
//! This build runs FusionBench's `method=dummy` evaluation: the model given by
//! `modelpool.models._pretrained_` is evaluated on the eight TA8 tasks with the task pool's base
//! CLIP, and the report is printed and saved to `report_save_path`. Overrides use FusionBench's
//! `key=value` syntax; the full YAML config tree (`modelpool=…`, `taskpool=…`) is the next step.

use anyhow::{bail, Context, Result};
use fusion_bench::device::Accelerator;
use fusion_bench::hub::Hub;
use fusion_bench::program::{self, DatasetRef, EvalPlan};
use fusion_bench::tasks::TA8;
use std::path::PathBuf;

const USAGE: &str = "usage: fusion_bench [method=dummy] [modelpool.models._pretrained_=ID|PATH] \
[taskpool.base_model=ID] [taskpool.test_datasets=sun397,mnist,...] [taskpool.batch_size=128] \
[fabric.accelerator=auto|cpu|gpu] [fast_dev_run=true] [report_save_path=PATH]";

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" | "null" => Ok(false),
        _ => bail!("{key}: expected true or false, got `{v}`"),
    }
}

fn plan_from_args(args: &[String]) -> Result<EvalPlan> {
    let mut plan = EvalPlan {
        model: "openai/clip-vit-base-patch32".into(),
        base_model: "openai/clip-vit-base-patch32".into(),
        processor: String::new(),
        tasks: Vec::new(),
        batch_size: 128,
        fast_dev_run: false,
        accelerator: Accelerator::Auto,
        report_save_path: None,
    };
    let mut task_names: Vec<String> = TA8.iter().map(|s| s.to_string()).collect();
    for arg in args {
        let (key, value) = arg
            .split_once('=')
            .with_context(|| format!("argument `{arg}` is not key=value\n{USAGE}"))?;
        let value = value.trim_matches(|c| c == '"' || c == '\'');
        match key.trim_start_matches('+') {
            "method" if value == "dummy" => {}
            "method" => bail!("method `{value}` is not available in this build (only `dummy`)"),
            "modelpool.models._pretrained_"
            | "modelpool.models._pretrained_.pretrained_model_name_or_path" => {
                plan.model = value.into()
            }
            "taskpool.base_model" | "taskpool.clip_model" => plan.base_model = value.into(),
            "taskpool.processor" => plan.processor = value.into(),
            "taskpool.test_datasets" => {
                task_names = value
                    .trim_matches(|c| c == '[' || c == ']')
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            }
            "taskpool.batch_size" => {
                plan.batch_size = value.parse().with_context(|| format!("{key}: `{value}`"))?
            }
            "fabric.accelerator" => plan.accelerator = value.parse()?,
            "fast_dev_run" => plan.fast_dev_run = parse_bool(key, value)?,
            "report_save_path" => {
                plan.report_save_path =
                    (!matches!(value, "null" | "false" | "")).then(|| PathBuf::from(value))
            }
            "print_config" | "seed" => {}
            other => bail!("unknown override `{other}`\n{USAGE}"),
        }
    }
    if plan.processor.is_empty() {
        plan.processor = plan.base_model.clone();
    }
    for name in task_names {
        let ds = DatasetRef::default_test(&name)
            .with_context(|| format!("taskpool.test_datasets: unknown task `{name}` (known: {})", TA8.join(", ")))?;
        plan.tasks.push((name, ds));
    }
    Ok(plan)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    let plan = plan_from_args(&args)?;
    let hub = Hub::default();
    tracing::info!(cache = %hub.cache().display(), model = %plan.model, base = %plan.base_model, "evaluating");
    let report = program::run(&plan, &hub)?;
    println!("{}", fusion_bench::report::to_python_json(&report));
    Ok(())
}
