//! Config composition against FusionBench 0.2.33: every `fusion_bench ...` command line of the
//! seed document (docs/modelpool/clip_vit.md) composes; golden `--cfg job` outputs of FusionBench
//! itself (scripts/fixtures/golden_config.sh) match our composed trees; errors are clear.
//!
//! Method configs other than `dummy` are not in `config/method/` yet. A seed command whose method
//! file is absent must fail with a clean "unknown option" error for the `method` group, and the
//! same command with `method=dummy` (and its `method.*` words dropped) must compose; once the
//! method file lands, the full command must compose.

use fusion_bench::config::{compose_at, ConfigError, Node, ProgramConfig, TaskPoolKind};
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config")
}

fn words(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_string).collect()
}

fn compose(line: &str) -> Result<fusion_bench::config::Composed, ConfigError> {
    compose_at(&words(line), &[config_dir()], UNIX_EPOCH + Duration::from_secs(1_700_000_000))
}

fn program(line: &str) -> ProgramConfig {
    compose(line)
        .unwrap_or_else(|e| panic!("{line}: {e}"))
        .program_config()
        .unwrap_or_else(|e| panic!("{line}: {e}"))
}

#[path = "common/seed.rs"]
mod seed;
use seed::SEED;

/// Map a stale method name the way the aliases do, to find its file.
fn method_file(line: &str) -> Option<PathBuf> {
    let m = line.split_whitespace().find_map(|w| w.strip_prefix("method="))?;
    let m = match m {
        "clip_fisher_merging" => "fisher_merging/clip_fisher_merging",
        "clip_regmean" => "regmean/clip_regmean",
        "weight_ensembling_moe" => "wemoe/weight_ensembling_moe",
        "task_vector_cos_similarity" => "analysis/task_vector_cos_similarity",
        "adamerging" => "adamerging/clip",
        m => m,
    };
    Some(config_dir().join("method").join(format!("{m}.yaml")))
}

fn with_dummy_method(line: &str) -> String {
    line.split_whitespace()
        .filter(|w| !w.starts_with("method."))
        .map(|w| if w.starts_with("method=") { "method=dummy" } else { w })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn every_seed_command_composes() {
    for line in SEED {
        let typo = line.contains("tsakpool=");
        let has_method = method_file(line).is_some_and(|p| p.is_file());
        if has_method && !typo {
            program(line);
            continue;
        }
        if !has_method {
            match compose(line) {
                Err(ConfigError::UnknownOption { group, choices, .. }) => {
                    assert_eq!(group, "method", "{line}");
                    assert!(choices.contains(&"dummy".to_string()), "{line}: {choices:?}");
                }
                other => {
                    panic!("{line}: expected an unknown method option, got {:?}", other.map(|_| ()))
                }
            }
        }
        let rest = with_dummy_method(line);
        if typo {
            // FusionBench fails on this typo too; we say which key was meant.
            let e = compose(&rest).expect_err("tsakpool must be refused");
            assert!(matches!(&e, ConfigError::NoSuchKey { key, .. } if key == "tsakpool"), "{e}");
            assert!(e.to_string().contains("did you mean 'taskpool'"), "{e}");
        } else {
            program(&rest);
        }
    }
}

#[test]
fn stale_model_overrides_set_the_model() {
    let p = program(SEED[0]);
    assert_eq!(p.modelpool.models.len(), 1);
    assert_eq!(p.modelpool.models[0].0, "_pretrained_");
    assert_eq!(p.modelpool.models[0].1.path, "tanganke/clip-vit-base-patch32_sun397");
    assert_eq!(
        p.report_path().as_deref(),
        Some("outputs/ViT-B-32/single-task/clip-vit-base-patch32_sun397.json")
    );
    let t = p.taskpool.expect("taskpool");
    assert_eq!(t.kind, TaskPoolKind::ClipVision);
    assert_eq!(t.test_datasets.len(), 8);
    assert_eq!(t.batch_size, 128);

    let p = program(SEED[1]);
    assert_eq!(p.modelpool.models[0].1.path, "tanganke/clip-vit-large-patch14_sun397");
    assert_eq!(p.taskpool.unwrap().clip_model.unwrap().path, "openai/clip-vit-large-patch14");

    for line in [SEED[4], SEED[5]] {
        let p = program(line);
        assert_eq!(p.modelpool.models[0].1.path, "tanganke/clip-vit-base-patch32_sun397", "{line}");
        // processor: ${.models._pretrained_} follows the override
        assert_eq!(p.modelpool.processor.unwrap().path, "tanganke/clip-vit-base-patch32_sun397");
    }
}

#[test]
fn typed_view_of_pools() {
    let p = program("method=dummy modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8 fabric.devices=4 fabric.accelerator=cpu seed=7");
    let names: Vec<_> = p.modelpool.models.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "_pretrained_",
            "sun397",
            "stanford-cars",
            "resisc45",
            "eurosat",
            "svhn",
            "gtsrb",
            "mnist",
            "dtd"
        ]
    );
    let t = p.taskpool.unwrap();
    let svhn = &t.test_datasets.iter().find(|(n, _)| n == "svhn").unwrap().1;
    assert_eq!(
        (svhn.path.as_str(), svhn.name.as_deref(), svhn.split.as_str()),
        ("svhn", Some("cropped_digits"), "test")
    );
    assert_eq!(t.base_model.as_deref(), Some("openai/clip-vit-base-patch32"));
    assert_eq!(p.fabric.device_count(), Some(4));
    assert_eq!(p.fabric.accelerator, "cpu");
    assert_eq!(p.seed, Some(7));
    assert!(p.method.target.as_deref().unwrap().ends_with("DummyAlgorithm"));
    assert_eq!(p.method.option.as_deref(), Some("dummy"));

    let p = program("--config-name clip-vit-base-patch32_robustness_corrupted corruption=pixelate fast_dev_run=true");
    let t = p.taskpool.unwrap();
    assert_eq!(t.kind, TaskPoolKind::LegacyClipVit);
    let tasks: Vec<_> = t
        .test_datasets
        .iter()
        .map(|(n, d)| (n.as_str(), d.path.as_str(), d.split.as_str()))
        .collect();
    assert_eq!(tasks[0], ("stanford_cars", "tanganke/stanford_cars", "pixelate"));
    assert_eq!(tasks.len(), 4);
    assert_eq!(t.fast_dev_run, Some(true));
    let tta = p.modelpool.test_datasets.unwrap();
    assert_eq!(tta[3].1.split, "pixelate");
    assert_eq!(p.modelpool.models.len(), 5);

    let p =
        program("method=dummy taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_val");
    let t = p.taskpool.unwrap();
    let v = t.test_datasets[0].1.validation.clone().expect("val split");
    assert_eq!((v.fraction, v.seed, v.return_split.as_str()), (Some(0.1), 0, "val"));
    assert_eq!(t.test_datasets[0].1.split, "train");
}

#[test]
fn interpolation_and_paths() {
    std::env::set_var("FUSION_BENCH_PROJECT_ROOT", "/fusion_bench_root");
    let p = program("-cn model_fusion merged_model_save_path='{log_dir}/merged'");
    let log_dir = p.path.log_dir.clone().unwrap();
    assert_eq!(log_dir, "/fusion_bench_root/outputs/model_fusion/2023-11-14_22-13-20");
    assert_eq!(p.report_path().unwrap(), format!("{log_dir}/program_report.json"));
    assert_eq!(p.merged_model_path().unwrap(), format!("{log_dir}/merged"));
    let c = compose("method=dummy fabric.loggers.root_dir=${path.output_dir}/logs").unwrap();
    let r = c.resolved().unwrap();
    assert_eq!(
        r.get_path("fabric.loggers.root_dir"),
        Some(&Node::Str("/fusion_bench_root/outputs/logs".into()))
    );
    // type preservation: a whole-value interpolation keeps the type
    let c =
        compose("method=dummy +method.steps=${fabric.devices} +method.label=n${fabric.devices}")
            .unwrap();
    let r = c.resolved().unwrap();
    assert_eq!(r.get_path("method.steps"), Some(&Node::Int(1)));
    assert_eq!(r.get_path("method.label"), Some(&Node::Str("n1".into())));
}

fn mask(n: &mut Node) {
    match n {
        Node::Str(s) => {
            let b = s.as_bytes();
            let mut out = String::new();
            let mut i = 0;
            while i < b.len() {
                let stamp = b.len() - i >= 19
                    && (0..19).all(|j| match j {
                        4 | 7 | 13 | 16 => b[i + j] == b'-',
                        10 => b[i + j] == b'_',
                        _ => b[i + j].is_ascii_digit(),
                    });
                if stamp {
                    out.push_str("<now>");
                    i += 19;
                } else {
                    out.push(b[i] as char);
                    i += 1;
                }
            }
            *s = out;
        }
        Node::Map(m) => {
            m.remove("work_dir");
            m.0.iter_mut().for_each(|(_, v)| mask(v));
        }
        Node::List(l) => l.iter_mut().for_each(mask),
        _ => {}
    }
}

#[test]
fn golden_cfg_job_matches_fusionbench() {
    std::env::set_var("FUSION_BENCH_PROJECT_ROOT", "/fusion_bench_root");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/config");
    let cases = std::fs::read_to_string(dir.join("cases.txt")).unwrap();
    let mut n = 0;
    for line in cases.lines().filter(|l| !l.starts_with('#') && l.contains('|')) {
        let (name, args) = line.split_once('|').unwrap();
        let name = name.trim();
        let golden = std::fs::read_to_string(dir.join(format!("{name}.yaml"))).unwrap();
        let mut want = Node::parse_yaml(&golden, name).unwrap();
        let mut args = words(args);
        args.extend(["--cfg".to_string(), "job".to_string()]);
        let c = compose_at(&args, &[config_dir()], UNIX_EPOCH)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut got = Node::parse_yaml(&c.to_yaml().unwrap(), name).unwrap();
        mask(&mut want);
        mask(&mut got);
        assert_eq!(
            got, want,
            "{name}: composed config differs from FusionBench's --cfg job output"
        );
        n += 1;
    }
    // Every golden file was compared: one case per `<name>.yaml`.
    let goldens = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "yaml"))
        .count();
    assert!(n > 0, "no case in cases.txt");
    assert_eq!(n, goldens, "cases compared vs golden .yaml files in {}", dir.display());
}

#[test]
fn errors_are_clear() {
    // unknown group option: lists the choices
    let e = compose("modelpool=CLIPVisionModelPool/nope").err().unwrap();
    let msg = e.to_string();
    assert!(msg.contains("could not find 'modelpool/CLIPVisionModelPool/nope'"), "{msg}");
    assert!(msg.contains("CLIPVisionModelPool/clip-vit-base-patch32_TA8"), "{msg}");
    // a stale method name is mapped to today's option
    assert!(compose("method=clip_regmean").is_ok());
    // an unknown method option is reported with the choices
    match compose("method=regmean/nope").err().unwrap() {
        ConfigError::UnknownOption { group, option, choices, .. } => {
            assert_eq!((group.as_str(), option.as_str()), ("method", "regmean/nope"));
            assert!(choices.contains(&"regmean/clip_regmean".into()), "{choices:?}");
        }
        e => panic!("{e}"),
    }
    // ??? names the key and how to set it
    let e =
        compose("modelpool=CLIPVisionModelPool/_template").unwrap().program_config().err().unwrap();
    assert!(matches!(&e, ConfigError::MissingValue { key } if key == "modelpool.models"), "{e}");
    assert!(e.to_string().contains("modelpool.models=VALUE"), "{e}");
    let e = compose("taskpool=CLIPVisionModelTaskPool/_template")
        .unwrap()
        .program_config()
        .err()
        .unwrap();
    assert!(
        matches!(&e, ConfigError::MissingValue { key } if key == "taskpool.test_datasets"),
        "{e}"
    );
    // bad override syntax
    for bad in ["method.scaling_factor", "a=b=c", "method=dummy,x", "x=[1,2", "=3", "--cfg nope"] {
        assert!(compose(bad).is_err(), "{bad} must be refused");
    }
    assert!(matches!(compose("seed=[1,").err().unwrap(), ConfigError::BadOverride { .. }));
    // plain override of a missing key, and + of an existing one
    assert!(matches!(
        compose("method.scaling_factor=0.3").err().unwrap(),
        ConfigError::NoSuchKey { .. }
    ));
    assert!(matches!(compose("+fast_dev_run=true").err().unwrap(), ConfigError::KeyExists { .. }));
    assert!(compose("+seed=3").is_ok(), "Hydra lets + set a key that holds null");
    // report_save_path=false
    let e = compose("report_save_path=false").unwrap().program_config().err().unwrap();
    assert!(e.to_string().contains("report_save_path=null"), "{e}");
    assert_eq!(program("report_save_path=null").report_save_path, None);
    // a group override for a group that is not in the defaults list
    assert!(matches!(
        compose("fabric/strategy=x").err().unwrap(),
        ConfigError::UnknownOption { .. }
            | ConfigError::GroupNotInDefaults { .. }
            | ConfigError::NoSuchKey { .. }
    ));
}

#[test]
fn override_values_are_typed_like_hydra() {
    let c = compose("method=dummy +method.a=0.3 +method.b=20 +method.c=true +method.d=null +method.e='0.3' +method.f=[a,1,2.5] +method.g={x:1,y:z} +method.h=1e-3 +method.i=\"q\"").unwrap();
    let m = c.node().get_path("method").unwrap();
    assert_eq!(m.get_path("a"), Some(&Node::Float(0.3)));
    assert_eq!(m.get_path("b"), Some(&Node::Int(20)));
    assert_eq!(m.get_path("c"), Some(&Node::Bool(true)));
    assert_eq!(m.get_path("d"), Some(&Node::Null));
    assert_eq!(m.get_path("e"), Some(&Node::Str("0.3".into())));
    assert_eq!(m.get_path("f.1"), Some(&Node::Int(1)));
    assert_eq!(m.get_path("g.y"), Some(&Node::Str("z".into())));
    assert_eq!(m.get_path("h"), Some(&Node::Float(1e-3)));
    assert_eq!(m.get_path("i"), Some(&Node::Str("q".into())));
    // ~key deletes; --cfg/--resolve/--package are recorded
    let c = compose("~merged_model_save_kwargs --cfg all --resolve -p method").unwrap();
    assert!(c.node().get_path("merged_model_save_kwargs").is_none());
    assert_eq!(c.cfg(), Some(fusion_bench::config::CfgKind::All));
    assert_eq!(c.to_yaml().unwrap().trim(), "_target_: fusion_bench.method.DummyAlgorithm");
    assert!(compose("--config-name=model_fusion").unwrap().node().get_path("fabric").is_none());
}
