//! `fusion_bench`: FusionBench's command line, on libtorch. `fusion_bench --help` lists the flags.
//!
//! This file only parses and dispatches: the command line is [`fusion_bench::cli`], the launch
//! roles [`fusion_bench::launch`], `corrupt` [`fusion_bench::corrupt::run`], one run
//! [`fusion_bench::program::run_config`], sweeps [`fusion_bench::sweep`].

use anyhow::Result;
use fusion_bench::cli::{self, Cli, Command};
use fusion_bench::config::{compose_from_args, default_config_dirs};
use fusion_bench::launch::Launch;
use fusion_bench::{program, sweep};

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
    let cli = Cli::parse(&args)?;
    match &cli.command {
        Command::Help => {
            print!("{}", cli::help());
            return Ok(());
        }
        Command::Version => {
            println!("{}", cli::version());
            return Ok(());
        }
        _ => {}
    }
    let launch =
        Launch::from_flags(&cli.launch, || Ok(fusion_cluster::slurm::SlurmTask::from_env()?))?;
    if let Command::Corrupt(args) = &cli.command {
        return fusion_bench::corrupt::run(args, &launch);
    }
    if cli.command == Command::Sweep {
        return sweep::run_sweep(cli.config_args, &launch);
    }
    let composed = compose_from_args(&cli.config_args, &default_config_dirs())?;
    tracing::info!(tree = %composed.describe_tree(), config = composed.config_name(), "config composed");
    if composed.cfg().is_some() {
        print!("{}", composed.to_yaml()?);
        return Ok(());
    }
    let cfg = composed.program_config()?;
    if cli.command == Command::Prefetch {
        return program::prefetch(&cfg);
    }
    if cfg.print_config || cfg.dry_run {
        eprint!("{}", composed.to_yaml()?);
    }
    if cfg.dry_run {
        return Ok(());
    }
    program::run_config(&cfg, &launch).map(|_| ())
}
