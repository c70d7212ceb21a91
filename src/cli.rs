//! The command line: FusionBench's (Hydra's) overrides and flags, plus this program's own flags.
//!
//! Every flag lives in [`FLAGS`], which both the parser and `--help` read, so the help lists
//! exactly what is accepted. Hydra's flags (`--cfg`, `--config-name`, ...) and the overrides are
//! passed on to [`crate::config`]; this program's flags (`-m`, `--prefetch`, the launch flags)
//! are taken out here.

use crate::launch::LaunchFlags;
use anyhow::{bail, Context, Result};

/// Who reads a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Hydra's flag, read by the config composer ([`crate::config::overrides::parse_args`]).
    Hydra,
    /// This program's own flag, taken out by [`Cli::parse`].
    Program,
}

/// One flag of the command line.
#[derive(Debug, Clone, Copy)]
pub struct Flag {
    /// Its names (`-m`, `--multirun`).
    pub names: &'static [&'static str],
    /// The placeholder of its value, if it takes one.
    pub value: Option<&'static str>,
    /// Who reads it.
    pub owner: Owner,
    /// One line of help.
    pub help: &'static str,
}

const fn flag(
    names: &'static [&'static str],
    value: Option<&'static str>,
    owner: Owner,
    help: &'static str,
) -> Flag {
    Flag { names, value, owner, help }
}

/// Every flag, in the order `--help` lists them.
pub const FLAGS: &[Flag] = &[
    flag(&["-h", "--help"], None, Owner::Program, "print this help and exit"),
    flag(&["-V", "--version"], None, Owner::Program, "print the version and exit"),
    flag(&["-cn", "--config-name"], Some("NAME"), Owner::Hydra, "the primary config (default: fabric_model_fusion)"),
    flag(&["-cp", "--config-path"], Some("DIR"), Owner::Hydra, "read the config tree from DIR instead of ./config, ./fusion_bench_config or the built-in tree"),
    flag(&["-cd", "--config-dir"], Some("DIR"), Owner::Hydra, "add DIR to the config search path, after the primary tree"),
    flag(&["-c", "--cfg"], Some("job|hydra|all"), Owner::Hydra, "print the composed config instead of running"),
    flag(&["--resolve"], None, Owner::Hydra, "with --cfg: resolve ${...} interpolations"),
    flag(&["-p", "--package"], Some("KEY"), Owner::Hydra, "with --cfg: print only this part of the config"),
    flag(&["-m", "--multirun"], None, Owner::Program, "sweep: comma lists in overrides are swept; one report per cell in the sweep folder (sweep_dir=DIR), reruns skip finished cells"),
    flag(&["--prefetch"], None, Owner::Program, "download every model and dataset the config names into the hub cache, then exit"),
    flag(&["--serve"], Some("HOST:PORT"), Owner::Program, "coordinate a distributed run here (and compute too); workers --join it"),
    flag(&["--join"], Some("HOST:PORT"), Owner::Program, "work for the coordinator at HOST:PORT (same command line)"),
    flag(&["--min-workers"], Some("N"), Owner::Program, "coordinator: wait for N workers before handing out work"),
    flag(&["--wait"], Some("SECONDS"), Owner::Program, "how long a coordinator waits for its workers, and a worker for its coordinator (default 60)"),
    flag(&["--hosts"], Some("H1:PORT,H2,..."), Owner::Program, "launch by hand on a few hosts (with --rank): rank 0 serves on H1:PORT"),
    flag(&["--rank"], Some("R"), Owner::Program, "this process's rank in --hosts"),
    flag(&["--job-dir"], Some("DIR"), Owner::Program, "the job's credentials folder, shared by its processes (default <path.output_dir>/.cluster/<job id>)"),
    flag(&["--node-name"], Some("NAME"), Owner::Program, "this worker's name in logs and in <report>.meta.json"),
];

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Print the help.
    Help,
    /// Print the version.
    Version,
    /// Download what the config names.
    Prefetch,
    /// A sweep over the comma lists.
    Sweep,
    /// Run the composed config once (or print it, with `--cfg`).
    Run,
    /// `fusion_bench corrupt ...`: write a corrupted split ([`crate::corrupt`]); the words after
    /// `corrupt`.
    Corrupt(Vec<String>),
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cli {
    /// What to do.
    pub command: Command,
    /// The launch flags.
    pub launch: LaunchFlags,
    /// Everything the config composer reads: Hydra's flags and the overrides, in order.
    pub config_args: Vec<String>,
}

fn find(name: &str) -> Option<&'static Flag> {
    FLAGS.iter().find(|f| f.names.contains(&name))
}

impl Cli {
    /// Parses the words after the program name.
    pub fn parse(args: &[String]) -> Result<Self> {
        if args.first().map(String::as_str) == Some("corrupt") {
            return Self::parse_corrupt(&args[1..]);
        }
        let mut launch = LaunchFlags::default();
        let mut config_args = Vec::new();
        let (mut help, mut version, mut prefetch, mut multirun) = (false, false, false, false);
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            i += 1;
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with('-') => (n, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            let Some(f) = find(name).filter(|_| name.starts_with('-')) else {
                config_args.push(arg.clone());
                continue;
            };
            if f.owner == Owner::Hydra {
                config_args.push(arg.clone());
                if f.value.is_some() && inline.is_none() {
                    if let Some(v) = args.get(i) {
                        config_args.push(v.clone());
                        i += 1;
                    }
                }
                continue;
            }
            let value = match (f.value, inline) {
                (None, Some(_)) => bail!("{name} takes no value (`{arg}`)"),
                (None, None) => None,
                (Some(_), Some(v)) => Some(v),
                (Some(placeholder), None) => {
                    let v = args.get(i).filter(|v| !v.starts_with("--"));
                    let v = v.ok_or_else(|| {
                        anyhow::anyhow!("{name} needs a value ({name} {placeholder})")
                    })?;
                    i += 1;
                    Some(v.clone())
                }
            };
            let slot = match f.names[f.names.len() - 1] {
                "--help" => {
                    help = true;
                    continue;
                }
                "--version" => {
                    version = true;
                    continue;
                }
                "--prefetch" => {
                    prefetch = true;
                    continue;
                }
                "--multirun" => {
                    multirun = true;
                    continue;
                }
                other => launch_slot(&mut launch, other)
                    .unwrap_or_else(|| unreachable!("flag {other} of FLAGS has no slot")),
            };
            if slot.is_some() {
                bail!("{name} given twice");
            }
            *slot = value;
        }
        let command = if help {
            Command::Help
        } else if version {
            Command::Version
        } else if multirun && prefetch {
            bail!("--prefetch with -m: prefetch one setting of the sweep (without -m)");
        } else if multirun {
            Command::Sweep
        } else if prefetch {
            Command::Prefetch
        } else {
            Command::Run
        };
        Ok(Self { command, launch, config_args })
    }
}

impl Cli {
    /// `corrupt ARGS`: the launch flags (`--serve`, `--join`, `--hosts`, ...) are this
    /// program's, as for a run; every other word is the corrupt command's.
    fn parse_corrupt(args: &[String]) -> Result<Self> {
        let mut launch = LaunchFlags::default();
        let mut rest = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            i += 1;
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            let Some(slot) = launch_slot(&mut launch, name) else {
                rest.push(arg.clone());
                continue;
            };
            let value = match inline {
                Some(v) => v,
                None => {
                    let v = args.get(i).filter(|v| !v.starts_with("--"));
                    i += 1;
                    v.with_context(|| format!("corrupt: {name} needs a value"))?.clone()
                }
            };
            if slot.replace(value).is_some() {
                bail!("corrupt: {name} given twice");
            }
        }
        Ok(Self { command: Command::Corrupt(rest), launch, config_args: Vec::new() })
    }
}

/// Where the launch flag `name` (its long name) goes; `None` for any other word.
fn launch_slot<'a>(launch: &'a mut LaunchFlags, name: &str) -> Option<&'a mut Option<String>> {
    Some(match name {
        "--serve" => &mut launch.serve,
        "--join" => &mut launch.join,
        "--min-workers" => &mut launch.min_workers,
        "--wait" => &mut launch.wait,
        "--hosts" => &mut launch.hosts,
        "--rank" => &mut launch.rank,
        "--job-dir" => &mut launch.job_dir,
        "--node-name" => &mut launch.node_name,
        _ => return None,
    })
}

/// `fusion_bench --version`: the program, its version and numerics version, libtorch's.
pub fn version() -> String {
    format!(
        "fusion_bench (Rust) {} (numerics {}; libtorch 2.11, tch 0.24)",
        env!("CARGO_PKG_VERSION"),
        crate::version::NUMERICS_VERSION
    )
}

/// The `--help` text: usage, every flag of [`FLAGS`] with one line each, the methods of the
/// registry, and where configs come from.
pub fn help() -> String {
    let mut out = format!(
        "{}\n\nFusionBench's command line on libtorch: Hydra-style overrides composed over FusionBench 0.2.33's\nconfig tree, e.g.\n  fusion_bench method=task_arithmetic method.scaling_factor=0.3 \\\n    modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 \\\n    taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8\n\nUsage: fusion_bench [FLAGS] [OVERRIDES]   (key=value, group=option, +key=value, ~key)\n\nFlags:\n",
        version()
    );
    let cols: Vec<(String, &str)> = FLAGS
        .iter()
        .map(|f| {
            let mut s = f.names.join(", ");
            if let Some(v) = f.value {
                s.push(' ');
                s.push_str(v);
            }
            (s, f.help)
        })
        .collect();
    let w = cols.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
    for (s, h) in cols {
        out.push_str(&format!("  {s:<w$}  {h}\n"));
    }
    out.push_str("\nCommands:\n  corrupt  write a corrupted copy of a dataset split into the hub cache (then `split: NAME`\n           evaluates on it); `fusion_bench corrupt --help` for details:\n");
    for f in crate::corrupt::FLAGS {
        let mut s = f.names.join(", ");
        if let Some(v) = f.value {
            s.push(' ');
            s.push_str(v);
        }
        out.push_str(&format!("    {s:<30}  {}\n", f.help));
    }
    out.push_str("\nMethods (method=...): ");
    out.push_str(&crate::methods::available().join(", "));
    out.push_str(
        "\n\nConfig tree: ./config, else ./fusion_bench_config, else the tree built into this binary\n\
         (--config-path replaces it, --config-dir adds to it). Models and datasets come from the\n\
         Hugging Face hub cache (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub) or local\n\
         folders, never the network (except --prefetch).\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Cli> {
        Cli::parse(&line.split_whitespace().map(str::to_string).collect::<Vec<_>>())
    }

    #[test]
    fn program_flags_are_taken_out_and_the_rest_passed_on_in_order() {
        let c = parse(
            "-m method=a,b --serve 0.0.0.0:7000 --cfg job --min-workers=2 x.y=1 --config-name cn",
        )
        .unwrap();
        assert_eq!(c.command, Command::Sweep);
        assert_eq!(c.launch.serve.as_deref(), Some("0.0.0.0:7000"));
        assert_eq!(c.launch.min_workers.as_deref(), Some("2"));
        assert_eq!(c.config_args, ["method=a,b", "--cfg", "job", "x.y=1", "--config-name", "cn"]);
        let c = parse("--hosts h1:1,h2 --rank 1 --job-dir /j --node-name n --wait 3 --join h:1")
            .unwrap();
        assert_eq!(c.command, Command::Run);
        let l = &c.launch;
        assert_eq!(
            (l.hosts.as_deref(), l.rank.as_deref(), l.job_dir.as_deref()),
            (Some("h1:1,h2"), Some("1"), Some("/j"))
        );
        assert_eq!(
            (l.node_name.as_deref(), l.wait.as_deref(), l.join.as_deref()),
            (Some("n"), Some("3"), Some("h:1"))
        );
        assert_eq!(parse("--prefetch method=dummy").unwrap().command, Command::Prefetch);
        assert_eq!(parse("method=dummy -h").unwrap().command, Command::Help);
        assert_eq!(parse("--version").unwrap().command, Command::Version);
        assert_eq!(
            parse("corrupt --dataset d --help").unwrap().command,
            Command::Corrupt(vec!["--dataset".into(), "d".into(), "--help".into()])
        );
        // The launch flags of `corrupt` are the program's, the rest the command's.
        let c = parse("corrupt --dataset d --serve 0.0.0.0:7000 --min-workers=2 --seed 3").unwrap();
        assert_eq!(
            c.command,
            Command::Corrupt(vec!["--dataset".into(), "d".into(), "--seed".into(), "3".into()])
        );
        assert_eq!(c.launch.serve.as_deref(), Some("0.0.0.0:7000"));
        assert_eq!(c.launch.min_workers.as_deref(), Some("2"));
        assert!(parse("corrupt --join").unwrap_err().to_string().contains("--join needs a value"));
        let e = parse("corrupt --rank 0 --rank 1").unwrap_err().to_string();
        assert!(e.contains("given twice"), "{e}");
    }

    #[test]
    fn bad_flags_are_named() {
        for (line, want) in [
            ("--serve", "--serve needs a value"),
            ("--serve --join h:1", "--serve needs a value"),
            ("--prefetch=1", "takes no value"),
            ("--rank 0 --rank 1", "given twice"),
            ("-m --prefetch a=1", "--prefetch with -m"),
        ] {
            let e = parse(line).unwrap_err().to_string();
            assert!(e.contains(want), "{line}: {e}");
        }
    }

    #[test]
    fn help_lists_every_flag_and_method_and_hydra_accepts_its_flags() {
        let h = help();
        for f in FLAGS {
            for n in f.names {
                assert!(h.contains(n), "--help lacks {n}");
            }
        }
        for f in crate::corrupt::FLAGS {
            assert!(h.contains(f.names[0]), "--help lacks corrupt's {}", f.names[0]);
        }
        assert!(h.contains("Commands:\n  corrupt"));
        for m in crate::methods::available() {
            assert!(h.contains(m.as_str()), "--help lacks method {m}");
        }
        // Every Hydra flag of the table is one the composer accepts.
        for f in FLAGS.iter().filter(|f| f.owner == Owner::Hydra) {
            for n in f.names {
                let mut args = vec![n.to_string()];
                if f.value.is_some() {
                    args.push(if n.ends_with("cfg") || *n == "-c" {
                        "job".into()
                    } else {
                        "x".into()
                    });
                }
                crate::config::overrides::parse_args(&args)
                    .unwrap_or_else(|e| panic!("the composer refuses {n}: {e}"));
            }
        }
    }
}
